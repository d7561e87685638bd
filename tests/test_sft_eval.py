"""`compeff sft` and `compeff eval` on the tiny local LM: a toy task whose label is readable from a
marker word; accuracy from chance to >= 0.9; LoRA; masks; pre-training checks; the eval harness against
logits computed directly; the served-model path over a loopback server."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compeff.config import ConfigError, load_recipe
from compeff.evaluate.classification import (
    EvalError,
    HFLabelScorer,
    label_distribution,
    label_owners,
    label_pieces,
    label_variants,
    local_first_tokens,
    served_label_scores,
    stratified_subset,
)
from compeff.evaluate.eval_stage import run_eval_stage
from compeff.evaluate.wordings import BUILTIN_WORDINGS
from compeff.runs import iter_jsonl
from compeff.train.sft import SftCheckError, run_sft_stage

FILLER = [
    "the",
    "film",
    "was",
    "plot",
    "actors",
    "music",
    "slow",
    "fun",
    "story",
    "scene",
    "camera",
    "ending",
]
MARKERS = {0: "dreadful", 1: "wonderful"}
LABELS = ["negative", "positive"]
TOY_WORDINGS = ("question", "instruction")  # a 2-layer toy learns two wordings in 200 steps


def toy_text(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
    words.insert(rng.randrange(len(words) + 1), MARKERS[label])
    return " ".join(words)


def write_toy(tmp_path: Path, n_train: int = 160, n_test: int = 40) -> tuple[Path, Path]:
    """A chat training set in eval's own wordings, and a labelled held-out test set."""
    rng = random.Random(0)
    train, test = tmp_path / "toy_sft.jsonl", tmp_path / "toy_test.jsonl"
    with train.open("w") as fh:
        for i in range(n_train):
            label = i % 2
            wording = BUILTIN_WORDINGS[TOY_WORDINGS[(i // 2) % len(TOY_WORDINGS)]]
            user = wording.render(toy_text(rng, label), LABELS)
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": LABELS[label]}]
            fh.write(json.dumps({"id": f"t{i}", "messages": messages, "teacher": "toy"}) + "\n")
    with test.open("w") as fh:
        for i in range(n_test):
            fh.write(json.dumps({"id": f"h{i}", "text": toy_text(rng, i % 2), "label": i % 2}) + "\n")
    return train, test


def recipe(tmp_path: Path, model: Path, train: Path, test: Path, name: str, *extra: str):
    return load_recipe(
        None,
        [
            f"run.dir={tmp_path / 'runs'}",
            f"run.name={name}",
            f"student.model={model}",
            f"sft.input={train}",
            "sft.max_length=128",
            "sft.per_device_batch_size=8",
            "sft.logging_steps=10",
            f"eval.sets=[{test}]",
            "eval.k_shot=0",
            "eval.seeds=[42]",
            "eval.chat_template=true",
            "eval.label_names=[negative, positive]",
            f"eval.wordings=[{', '.join(TOY_WORDINGS)}]",
            *extra,
        ],
    )


def accuracy(manifest) -> float:
    return next(iter(manifest["results"]["sets"].values()))["accuracy"]


def test_full_sft_lifts_accuracy_from_chance(tmp_path, tiny_lm):
    train, test = write_toy(tmp_path)
    before = run_eval_stage(
        recipe(tmp_path, tiny_lm, train, test, "base", f"eval.model={tiny_lm}"), progress=False
    )
    assert accuracy(before) <= 0.7  # a random model: chance level
    r = recipe(tmp_path, tiny_lm, train, test, "full", "sft.learning_rate=3e-3", "sft.max_steps=200")
    manifest = run_sft_stage(r, progress=False)
    out = r.run_dir / "sft"
    assert manifest["status"] == "complete" and manifest["final_loss"] < 0.5
    assert manifest["reload_max_abs_diff"] < 1e-4
    card = (out / "model" / "README.md").read_text()
    assert "teacher: toy" in card and "training samples: 160" in card and "final training loss" in card
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any("loss" in row for row in iter_jsonl(out / "data.jsonl"))
    after = run_eval_stage(r, progress=False)  # eval.model unset: the run's sft output
    assert after["results"]["model"] == str(out / "model")
    assert accuracy(after) >= 0.9
    md = (r.run_dir / "eval" / "results.md").read_text()
    assert "overall" in md and "Confusion" in md
    assert (r.run_dir / "eval" / "results.csv").read_text().startswith("set,wording,n,accuracy")
    wordings = next(iter(after["results"]["sets"].values()))["wordings"]
    assert sorted(wordings) == sorted(TOY_WORDINGS)  # every model is scored on every wording
    assert all(w["accuracy"] >= 0.8 for w in wordings.values())
    side = recipe(tmp_path, tiny_lm, train, test, "full", "sft.learning_rate=3e-3", "sft.max_steps=200",
                  "eval.compare=[student]")  # fmt: skip
    both = run_eval_stage(side, force=True, progress=False)["results"]["comparison"]
    assert both["evaluated"]["model"] == str(out / "model") and both["student"]["model"] == str(tiny_lm)
    assert both["evaluated"]["overall"]["accuracy"] == 100 * accuracy(after)  # the same harness
    assert both["student"]["overall"]["accuracy"] <= 70  # the student before sft: chance level
    assert "Side by side" in (r.run_dir / "eval" / "results.md").read_text()


def test_lora_adapter_trains_saves_and_reloads(tmp_path, tiny_lm):
    train, test = write_toy(tmp_path)
    r = recipe(
        tmp_path, tiny_lm, train, test, "lora", "sft.lora_r=16", "sft.lora_alpha=32", "sft.learning_rate=3e-3",
        "sft.max_steps=200",
    )  # fmt: skip
    manifest = run_sft_stage(r, progress=False)
    model_dir = r.run_dir / "sft" / "model"
    assert (model_dir / "adapter_config.json").exists() and not (model_dir / "model.safetensors").exists()
    assert manifest["reload_max_abs_diff"] < 1e-4  # the saved adapter scores as the trained model did
    result = run_eval_stage(r, progress=False)
    assert result["results"]["adapter"] == str(model_dir)
    assert accuracy(result) >= 0.9

    # the adapter goes back on the weights it was trained on, even after the recipe's student changed
    from compeff.evaluate.eval_stage import resolve_eval_model

    changed = r.model_copy(update={"student": r.student.model_copy(update={"model": "no/such-student"})})
    assert resolve_eval_model(changed) == (str(tiny_lm), str(model_dir))


def test_masks_after_collation_cover_only_answers(tmp_path, tiny_lm):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from compeff.train.sft import check_collated_masks, preflight, to_prompt_completion

    train, _ = write_toy(tmp_path, n_train=8)
    rows = list(iter_jsonl(train))
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    pairs = to_prompt_completion(rows)
    report = preflight(tok, pairs, [r["id"] for r in rows], 128)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_lm),
        args=SFTConfig(
            output_dir=str(tmp_path / "o"),
            max_length=128,
            report_to=[],
            use_cpu=True,
            activation_checkpointing=False,
            gradient_checkpointing=False,
        ),  # fmt: skip
        train_dataset=Dataset.from_list(pairs),
        processing_class=tok,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    for row, labels, n_answer in zip(rows, batch["labels"], report["completion_tokens"], strict=True):
        labelled = labels[labels != -100].tolist()
        answer = tok.decode(labelled)
        assert answer.startswith(row["messages"][-1]["content"])  # the answer (+ end of turn), no prompt
        assert len(labelled) == n_answer
    check_collated_masks(trainer, report["completion_tokens"], packing=False)
    with pytest.raises(SftCheckError, match="prompt tokens would be trained on"):
        check_collated_masks(trainer, [n + 1 for n in report["completion_tokens"]], packing=False)


def test_pre_training_checks_refuse_loudly(tmp_path, tiny_lm):
    train, test = write_toy(tmp_path, n_train=8)
    bare = tmp_path / "bare"
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = None
    tok.pad_token = None
    tok.save_pretrained(bare)
    AutoModelForCausalLM.from_pretrained(tiny_lm).save_pretrained(bare)
    with pytest.raises(SftCheckError, match="no chat template"):
        run_sft_stage(recipe(tmp_path, bare, train, test, "c1"), progress=False)
    with pytest.raises(SftCheckError, match="no pad token"):
        run_sft_stage(recipe(tmp_path, bare, train, test, "c2", "sft.chat_template=chatml"), progress=False)
    with pytest.raises(SftCheckError, match="lose their whole answer"):
        run_sft_stage(recipe(tmp_path, tiny_lm, train, test, "c3", "sft.max_length=10"), progress=False)
    with pytest.raises(ConfigError, match="sft.lora_r too"):  # 4-bit weights train only through LoRA
        run_sft_stage(recipe(tmp_path, tiny_lm, train, test, "c4", "sft.load_in_4bit=true"), progress=False)


def test_label_evidence_is_the_mass_of_every_spelling(tiny_lm):
    """A local model's label evidence is the log of the summed probability of the first tokens of all its
    spellings, read at the answer's first position: checked against the model's own logits, unbatched."""
    wording = BUILTIN_WORDINGS["question"]
    scorer = HFLabelScorer(str(tiny_lm), batch_size=3)
    turns = [wording.render(t, LABELS) for t in ("a", "dull slow plot here", "fun")]
    preds, mass = scorer.predict(turns, LABELS)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    first = {v: tok(v, add_special_tokens=False)["input_ids"][0] for n in LABELS for v in label_variants(n)}
    for turn, pred, row in zip(turns, preds, mass, strict=True):
        with torch.inference_mode():  # unbatched, unpadded: the direct computation
            ids = tok(f"{turn}\nAnswer:")["input_ids"]
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        direct = []
        starts = [{first[v] for v in label_variants(name)} for name in LABELS]
        for own, other in ((starts[0], starts[1]), (starts[1], starts[0])):
            own = own - other  # a token that starts both labels' spellings is evidence for neither
            direct.append(float(torch.logsumexp(logprobs[sorted(own)], 0)))
        assert np.allclose(row, direct, atol=1e-4)
        assert pred == int(np.argmax(direct))
    probs = label_distribution(mass)
    assert np.allclose(probs.sum(1), 1.0) and probs.shape == (3, 2)


def test_label_collisions_and_served_scores(tiny_lm):
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    # every spelling of 'positively' starts like one of 'positive': no token of its own, one clear error
    with pytest.raises(EvalError, match="starts with the same token as"):
        label_owners(local_first_tokens(tok, ["positive", "positively"]), ["positive", "positively"])
    tops = [
        {"token": " pos", "logprob": -0.2},
        {"token": "neg", "logprob": -1.9},
        {"token": "x", "logprob": -3},
    ]
    assert served_label_scores(tops, LABELS).tolist() == [-1.9, -0.2]
    # a token that starts two label words is no evidence for either (it used to stop the evaluation)
    three = ["negative", "neutral", "positive"]
    tops3 = [{"token": "n", "logprob": -0.1}, {"token": "neutral", "logprob": -2.0}]
    assert served_label_scores(tops3, three).tolist() == [-np.inf, -2.0, -np.inf]


def test_label_tokens_of_the_served_tokenizer():
    three = ["negative", "neutral", "positive"]
    # the served tokenizer starts "Negative" and "Neutral" with the same token "N": that token is left out
    first = {v: v for name in three for v in label_variants(name)}
    first.update({"Negative": "N", "Neutral": "N", " negative": " neg"})
    pieces = label_pieces(first, three)
    assert "N" not in pieces and pieces[" neg"] == 0 and pieces["neutral"] == 1
    tops = [{"token": "N", "logprob": -0.1}, {"token": " neg", "logprob": -1.0}, {"token": "negative", "logprob": -1.0},
            {"token": "n", "logprob": -0.5}]  # fmt: skip
    scores = served_label_scores(tops, three, pieces)
    assert scores[0] == pytest.approx(np.log(2 * np.exp(-1.0))) and scores[1] == scores[2] == -np.inf
    # a label none of whose spellings has a first token of its own cannot be scored: one clear error
    clash = {v: "ne" for name in three[:2] for v in label_variants(name)} | {
        v: v for v in label_variants("positive")
    }
    with pytest.raises(EvalError, match="'negative' starts with the same token as neutral"):
        label_pieces(clash, three)
    assert stratified_subset([0] * 80 + [1] * 20, 10) == sorted(stratified_subset([0] * 80 + [1] * 20, 10))
    picked = stratified_subset([0] * 80 + [1] * 20, 10)
    assert sum(1 for i in picked if i >= 80) == 2 and len(picked) == 10


def test_eval_of_a_served_model(tmp_path):
    """The openai backend reads the label from the served model's top log-probabilities."""
    from compeff.teachers.fake_server import FakeServer

    def responder(messages, body):
        text = messages[-1]["content"].rsplit("Text:", 1)[-1]  # after k-shot demos, if any
        first = "positive" if MARKERS[1] in text else "negative"
        other = "negative" if first == "positive" else "positive"
        return first, [{"token": first[:3], "logprob": -0.1}, {"token": other[:3], "logprob": -2.5}]

    _, test = write_toy(tmp_path, n_train=2, n_test=20)
    with FakeServer(responder=responder, max_seconds=60) as srv:
        r = load_recipe(
            None,
            [
                f"run.dir={tmp_path / 'runs'}",
                "run.name=served",
                "teacher.backend=openai",
                f"teacher.base_urls=[{srv.base_url}]",
                "teacher.cache=null",
                "eval.backend=openai",
                "eval.model=teacher",
                f"eval.sets=[{test}]",
                "eval.k_shot=2",
                "eval.seeds=[42, 52]",
                "eval.label_names=[negative, positive]",
            ],
        )
        result = run_eval_stage(r, progress=False)
    assert accuracy(result) == 1.0
    assert result["results"]["overall"]["accuracy"] == pytest.approx(100.0)


def test_packing_keeps_the_answer_masks(tmp_path, tiny_lm):
    train, test = write_toy(tmp_path, n_train=24)
    r = recipe(tmp_path, tiny_lm, train, test, "packed", "sft.packing=true", "sft.max_steps=3")
    manifest = run_sft_stage(r, progress=False)  # the packed-label check runs before the first step
    assert manifest["status"] == "complete" and manifest["steps"] == 3


def test_a_failed_served_call_gets_no_row_and_is_asked_again(tmp_path):
    """A served call that fails (HTTP 500, no retry left) is kept in failures.jsonl and gets no row: the
    wording stays incomplete and the next run scores it again (the whole wording, the prompts unchanged)."""
    from compeff.teachers.fake_server import FakeServer

    def responder(messages, body):
        first = "positive" if MARKERS[1] in messages[-1]["content"] else "negative"
        return first, [{"token": first, "logprob": -0.1}]

    test = tmp_path / "set.jsonl"
    rng = random.Random(3)
    rows = [{"id": f"h{i}", "text": toy_text(rng, i % 2), "label": i % 2} for i in range(6)]
    rows[2]["text"] += " [[first:1:500]]"  # the fake server fails this prompt's first attempt
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeServer(responder=responder, max_seconds=60) as srv:
        r = load_recipe(None, [f"run.dir={tmp_path / 'runs'}", "run.name=retry", "teacher.backend=openai",
                               f"teacher.base_urls=[{srv.base_url}]", "teacher.cache=null", "teacher.max_retries=0",
                               "eval.backend=openai", "eval.model=teacher", f"eval.sets=[{test}]",
                               "eval.wordings=[question]", "eval.label_names=[negative, positive]"])  # fmt: skip
        first = run_eval_stage(r, progress=False)
        data = tmp_path / "runs" / "retry" / "eval" / "data.jsonl"
        assert first["counts"]["failed"] == 1 and sum(1 for _ in iter_jsonl(data)) == 5
        assert accuracy(first) == pytest.approx(5 / 6)  # the failed text counts as a miss this time
        asked = srv.stats.requests
        second = run_eval_stage(r, progress=False)
        assert srv.stats.requests == asked + 6  # the incomplete wording was asked again
    assert sum(1 for _ in iter_jsonl(data)) == 6 and accuracy(second) == 1.0


@pytest.mark.parametrize("lora", [None, "merged", "adapter"])
def test_bf16_sft_completes_on_cpu_with_a_card(tmp_path, tiny_lm, lora):
    """bf16 training on CPU ends with the model saved, reloaded in bf16 within bf16's tolerance, and a card;
    the manifest says which dtype was compared."""
    train, test = write_toy(tmp_path, n_train=32)
    extra = ["sft.bf16=on", "sft.max_steps=6", "sft.learning_rate=1e-3"]
    if lora:
        extra += ["sft.lora_r=8", "sft.lora_alpha=16", f"sft.merge={lora == 'merged'}"]
    r = recipe(tmp_path, tiny_lm, train, test, f"bf16-{lora}", *extra)
    manifest = run_sft_stage(r, progress=False)
    model_dir = r.run_dir / "sft" / "model"
    assert manifest["status"] == "complete" and (model_dir / "README.md").is_file()
    assert manifest["reload_dtype"] == "bfloat16"
    # reloaded in bf16 as trained: within a few bf16 steps of the largest logit, no more
    assert manifest["reload_max_abs_diff"] <= manifest["reload_tolerance"]
    assert manifest["reload_tolerance"] == max(1e-2, manifest["reload_logit_scale"] / 64)
    if lora != "adapter":
        saved = AutoModelForCausalLM.from_pretrained(model_dir)
        assert saved.dtype == torch.bfloat16  # saved as trained, not widened to fp32


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="QLoRA needs bitsandbytes (pip install 'compeff[qlora]'; its CPU backend runs NF4 here)",
)
@pytest.mark.parametrize("merge", [False, True])
def test_qlora_sft_completes_on_cpu(tmp_path, tiny_lm, merge):
    """NF4 base + LoRA on bitsandbytes' CPU backend: trains, saves, reloads in NF4 within its tolerance."""
    train, test = write_toy(tmp_path, n_train=32)
    extra = ["sft.load_in_4bit=true", "sft.lora_r=8", "sft.lora_alpha=16", "sft.max_steps=4",
             "sft.learning_rate=1e-3", f"sft.merge={merge}"]  # fmt: skip
    r = recipe(tmp_path, tiny_lm, train, test, f"qlora-{merge}", *extra)
    manifest = run_sft_stage(r, progress=False)
    assert manifest["status"] == "complete" and (r.run_dir / "sft" / "model" / "README.md").is_file()
    assert manifest["reload_dtype"] == "nf4"
    assert manifest["reload_max_abs_diff"] <= manifest["reload_tolerance"]
