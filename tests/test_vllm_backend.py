"""The in-process vLLM backend on CPU: answers shaped as vLLM gives them (its own output classes when vllm
is importable, else objects built to the shape vLLM documents) through compeff's VLLMTeacher, on their own
and inside the generate stage (label scoring and the teacher's top-k log-probabilities)."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
from transformers import AutoTokenizer

from compeff import top_logprobs
from compeff.config import load_recipe
from compeff.runs import iter_jsonl
from compeff.teachers import ChatRequest, SamplingParams, make_teacher

ANSWER = "the film was great"
LABELS = ("positive", "negative", "neutral")


# the shape vllm/logprobs.py and vllm/outputs.py document (vLLM 0.11 and later)
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    def __init__(self, request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.prompt_logprobs, self.outputs, self.finished = prompt_logprobs, outputs, finished


class DocumentedSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class ScriptedLLM:
    """Stands in for ``vllm.LLM`` (no GPU here): answers every chat with the same words in the model's own
    tokens, each position listing its k most likely tokens as vLLM does (the sampled token first, plus
    the k best; at the third position the sampled token is not among them). A one-token request is a
    label question: ``positive`` first, then ``negative`` and ``neutral``."""

    classes: dict = {}

    def __init__(self, model: str, max_logprobs: int = 20, **engine_kwargs):
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_logprobs = max_logprobs  # vLLM's engine argument and its default

    def first_id(self, word: str) -> int:
        return self.tokenizer(word, add_special_tokens=False)["input_ids"][0]

    def position(self, sampled: int, k: int, step: int) -> dict:
        make = self.classes["Logprob"]
        others = [i for i in range(10, 10 + k + 1) if i != sampled][:k]
        listed = {}
        if step == 2:  # sampled outside the top-k: k + 1 entries, its own rank beyond k
            listed[sampled] = make(logprob=-6.0, rank=k + 5, decoded_token=self.tokenizer.decode([sampled]))
            for rank, i in enumerate(others, start=1):
                listed[i] = make(logprob=-0.5 * rank, rank=rank, decoded_token=self.tokenizer.decode([i]))
            return listed
        listed[sampled] = make(logprob=-0.2, rank=1, decoded_token=self.tokenizer.decode([sampled]))
        for rank, i in enumerate(others[: k - 1], start=2):
            listed[i] = make(logprob=-0.5 * rank, rank=rank, decoded_token=self.tokenizer.decode([i]))
        return listed

    def chat(self, conversations, sampling_params, use_tqdm=True):
        outputs = []
        for n, (_messages, params) in enumerate(zip(conversations, sampling_params)):
            k = params.logprobs or 0
            if k > self.max_logprobs:  # as vLLM refuses a request above the engine's max_logprobs
                raise ValueError(f"Requested sample logprobs of {k}, which is greater than max allowed: 20")
            if params.max_tokens == 1:
                ids = [self.first_id(LABELS[0])]
                make = self.classes["Logprob"]
                first = {
                    self.first_id(w): make(logprob=lp, rank=r, decoded_token=w)
                    for r, (w, lp) in enumerate(zip(LABELS, (-0.3, -1.6, -2.4)), start=1)
                }
                logprobs = [first] if params.logprobs is not None else None
            else:
                ids = self.tokenizer(ANSWER, add_special_tokens=False)["input_ids"][: params.max_tokens]
                logprobs = None
                if params.logprobs is not None:
                    logprobs = [self.position(t, k, s) for s, t in enumerate(ids)]
            completion = self.classes["CompletionOutput"](
                index=0,
                text=self.tokenizer.decode(ids),
                token_ids=ids,
                cumulative_logprob=None,
                logprobs=logprobs,
                finish_reason="stop",
                stop_reason=None,
            )
            outputs.append(
                self.classes["RequestOutput"](
                    request_id=str(n),
                    prompt=None,
                    prompt_token_ids=[1, 2, 3],
                    prompt_logprobs=None,
                    outputs=[completion],
                    finished=True,
                )
            )
        return outputs


@pytest.fixture(params=["documented", "vllm"])
def vllm_engine(request, monkeypatch):
    """vLLM as compeff imports it, with ScriptedLLM in place of the engine: vLLM's own output classes
    and SamplingParams when it is installed, else the documented shape (a module of that name)."""
    if request.param == "vllm":
        vllm = pytest.importorskip("vllm", reason="vllm is not installed: its own output classes untested")
        from vllm.outputs import CompletionOutput as VCompletion
        from vllm.outputs import RequestOutput as VRequest

        try:
            from vllm.logprobs import Logprob as VLogprob
        except ImportError:  # vLLM before 0.11
            from vllm.sequence import Logprob as VLogprob
        classes = {"Logprob": VLogprob, "CompletionOutput": VCompletion, "RequestOutput": VRequest}
        monkeypatch.setattr(vllm, "LLM", ScriptedLLM)
    else:
        classes = {"Logprob": Logprob, "CompletionOutput": CompletionOutput, "RequestOutput": RequestOutput}
        module = types.ModuleType("vllm")
        module.LLM = ScriptedLLM
        module.SamplingParams = DocumentedSamplingParams
        module.sampling_params = types.SimpleNamespace()
        monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(ScriptedLLM, "classes", classes)
    return request.param


def test_vllm_answers_carry_their_top_logprobs_with_token_ids(vllm_engine, tiny_lm):
    """Every generated token: its id and log-probability, and the k most likely alternatives (the
    sampled token left out where it is not among them), in the layout the other backends give."""
    settings = load_recipe(None, ["teacher.backend=vllm", f"teacher.model={tiny_lm}"]).teacher
    teacher = make_teacher(settings)
    wide = SamplingParams(temperature=0.0, max_tokens=16, logprobs=True, top_logprobs=64)
    (result,) = list(  # the engine is started for the recipe's widest top-k (128), not vLLM's default 20
        teacher.generate([ChatRequest(id="w", messages=[{"role": "user", "content": "hi"}], params=wide)])
    )
    assert result.ok and len(result.logprobs[0]["content"][0]["top_logprobs"]) == 64
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=True, top_logprobs=3)
    (result,) = list(
        teacher.generate([ChatRequest(id="a", messages=[{"role": "user", "content": "hi"}], params=params)])
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    assert result.ok and result.text == tokenizer.decode(ids)
    content = result.logprobs[0]["content"]
    assert [e["id"] for e in content] == ids
    for step, entry in enumerate(content):
        tops = entry["top_logprobs"]
        assert len(tops) == 3 and [t["logprob"] for t in tops] == sorted(
            (t["logprob"] for t in tops), reverse=True
        )
        if step == 2:
            assert entry["logprob"] == -6.0 and entry["id"] not in [t["id"] for t in tops]
        else:
            assert entry["logprob"] == pytest.approx(-0.2) and tops[0]["id"] == entry["id"]
    packed = top_logprobs.pack(content, 3, top_logprobs.token_id_lookup(tokenizer), "v")
    tokens, top_ids, lps = top_logprobs.unpack(packed)
    assert tokens.tolist() == ids and packed["unmapped"] == 0 and np.isfinite(lps).all()
    # no log-probabilities asked, none given
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    (bare,) = list(
        teacher.generate([ChatRequest(id="b", messages=[{"role": "user", "content": "hi"}], params=plain)])
    )
    assert bare.ok and bare.logprobs is None


def test_generate_with_the_vllm_backend_scores_labels_and_keeps_logprobs(vllm_engine, tiny_lm, tmp_path):
    """generate on the vllm backend: closed tasks read as label distributions (no fallback to sampled
    text), and with label scoring off every answer keeps its top-k in the teacher's own ids, which
    sft.loss: kd lines up with the answer."""
    from compeff.synth.generate import run_generate_stage
    from compeff.synth.seed_tasks import seed_task_rows
    from compeff.train.logit_kd import check_vocabulary, kd_features

    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "".join(json.dumps({"id": f"u{i}", "text": f"the film {i} was fun"}) + "\n" for i in range(8))
    )
    rows = seed_task_rows(["polarity", "polarity3"])
    base = [f"run.dir={tmp_path / 'runs'}", "teacher.backend=vllm", f"teacher.model={tiny_lm}",
            f"student.model={tiny_lm}", "teacher.cache=null", f"data.user_texts=[{texts}]",
            "generate.n_samples=8", "generate.teacher_top_logprobs=3"]  # fmt: skip

    def generate(name: str, *extra: str) -> list[dict]:
        recipe = load_recipe(None, [*base, f"run.name={name}", *extra])
        (recipe.run_dir / "tasks").mkdir(parents=True)
        (recipe.run_dir / "tasks" / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run_generate_stage(recipe, progress=False)
        return list(iter_jsonl(recipe.run_dir / "generate" / "data.jsonl"))

    labelled = generate("labels")
    assert len(labelled) == 8
    for sample in labelled:
        probs = sample["label_probs"]
        assert max(probs, key=probs.get) == "positive" == sample["messages"][-1]["content"]
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)

    sampled = generate("topk", "generate.label_scoring=false", "generate.qc=false")
    assert len(sampled) == 8
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    for sample in sampled:
        field = sample[top_logprobs.FIELD]
        assert field["vocab"] == top_logprobs.vocab_fingerprint(tokenizer) and field["unmapped"] == 0
        assert top_logprobs.unpack(field)[0].tolist() == ids
    check_vocabulary(tokenizer, sampled)
    pairs = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in sampled]
    features, refused, _ = kd_features(tokenizer, sampled, pairs, 512)
    assert len(features) == 8 and not refused
