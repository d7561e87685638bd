"""The hf backend on tiny local causal LMs (tokenizer trained here, random Llama/Qwen2 weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from compeff.teachers import ChatRequest, SamplingParams, TeacherUnavailable
from compeff.teachers.hf_local import HFTeacher


def reqs(texts, **params):
    p = SamplingParams(temperature=0.0, max_tokens=8, **params)
    return [
        ChatRequest(id=str(i), messages=[{"role": "user", "content": t}], params=p)
        for i, t in enumerate(texts)
    ]


TEXTS = [
    "great movie",
    "the plot was boring and the acting terrible, really not good",
    "ok",
    "i love this film a lot",
]


@pytest.mark.parametrize("fixture", ["tiny_lm", "tiny_qwen"])
def test_batched_left_padded_generation_matches_one_by_one(request, fixture):
    path = request.getfixturevalue(fixture)
    batched = {r.id: r for r in HFTeacher(str(path), batch_size=4, device="cpu").generate(reqs(TEXTS))}
    single = {r.id: r for r in HFTeacher(str(path), batch_size=1, device="cpu").generate(reqs(TEXTS))}
    assert set(batched) == set(single) == {"0", "1", "2", "3"}
    for rid in batched:
        assert batched[rid].ok and batched[rid].text == single[rid].text
        assert batched[rid].usage == single[rid].usage


def test_prompt_goes_through_the_chat_template(tiny_lm):
    teacher = HFTeacher(str(tiny_lm), device="cpu")
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "great movie"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    expected = len(tok(text, add_special_tokens=False)["input_ids"])
    [result] = list(teacher.generate(reqs(["great movie"])))
    assert result.usage["prompt_tokens"] == expected
    assert 0 < result.usage["completion_tokens"] <= 8


def test_logprobs_are_log_probabilities(tiny_lm):
    teacher = HFTeacher(str(tiny_lm), device="cpu")
    [result] = list(teacher.generate(reqs(["great movie"], logprobs=True, top_logprobs=3)))
    tokens = result.logprobs[0]["content"]
    assert len(tokens) == result.usage["completion_tokens"]
    for tok in tokens:
        assert tok["logprob"] <= 0
        tops = [t["logprob"] for t in tok["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tok["logprob"] == pytest.approx(tops[0], abs=1e-5)  # greedy: the chosen token is the top one


def test_n_answers_greedy_and_seeded(tiny_lm):
    teacher = HFTeacher(str(tiny_lm), device="cpu")
    greedy = list(teacher.generate(reqs(["great movie"], n=3)))[0]
    assert len(greedy.texts) == 3 and len(set(greedy.texts)) == 1
    p = SamplingParams(temperature=1.5, max_tokens=8, n=3, seed=1)
    ask = [ChatRequest(id="s", messages=[{"role": "user", "content": "great movie"}], params=p)]
    a = list(teacher.generate(ask))[0]
    b = list(teacher.generate(ask))[0]
    assert a.ok and len(a.texts) == 3 and a.texts == b.texts
    assert len(set(a.texts)) > 1  # a random 2-layer LM at temperature 1.5 does not repeat itself


def test_sampled_generation(tiny_lm):
    teacher = HFTeacher(str(tiny_lm), device="cpu")
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=3)
    [result] = list(
        teacher.generate([ChatRequest(id="s", messages=[{"role": "user", "content": "hi"}], params=p)])
    )
    assert result.ok and result.usage["completion_tokens"] <= 6


def test_too_long_prompt_fails_that_request_only(tiny_lm):
    teacher = HFTeacher(str(tiny_lm), device="cpu", max_prompt_tokens=40)
    results = {r.id: r for r in teacher.generate(reqs(["short", "word " * 200]))}
    assert results["0"].ok
    assert not results["1"].ok and results["1"].error_kind == "input" and "exceeds" in results["1"].error


def test_model_without_chat_template_is_refused(tiny_lm, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = None
    import shutil

    target = tmp_path / "no-template"
    shutil.copytree(tiny_lm, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(target)
    with pytest.raises(TeacherUnavailable, match="chat template"):
        HFTeacher(str(target), device="cpu")


def test_the_tests_tiny_chat_model_is_built_once_and_speaks_the_list_format(compeff_home, tiny_chat):
    from tiny_chat import tiny_chat_path

    from compeff.prompts import render_prompt
    from compeff.synth.attributes import parse_attributes

    path = tiny_chat
    assert compeff_home in Path(path).parents
    stamp = (Path(path) / "config.json").stat().st_mtime
    assert tiny_chat_path(compeff_home) == path
    assert (Path(path) / "config.json").stat().st_mtime == stamp  # not rebuilt
    prompt = render_prompt("enumerate", text="What a wonderful film, I cried at the end.")
    ask = [
        ChatRequest(
            id="e",
            messages=[{"role": "user", "content": prompt}],
            params=SamplingParams(temperature=0, max_tokens=120),
        )
    ]
    [result] = list(HFTeacher(str(path), device="cpu").generate(ask))
    # a numbered list with bold names that the parser reads (how many items a 2-layer model trained for
    # 300 steps writes depends on the CPU's float kernels: one on an AVX2-only machine, more elsewhere)
    assert result.text.startswith("1. **")
    assert parse_attributes(result.text)
