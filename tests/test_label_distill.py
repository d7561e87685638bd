"""Closed tasks end to end on real tiny models: the seed tasks, the teacher's answers read as label
distributions (and the confidence QC), soft-label KD at the answer's first token, and the output layer
run only at answer positions (same loss and gradients as the model's own)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from compeff.config import ConfigError, load_recipe
from compeff.evaluate.classification import HFLabelScorer, label_distribution
from compeff.runs import iter_jsonl
from compeff.synth.instructions import pairing_prompts, plan_pairings, wording_index
from compeff.synth.seed_tasks import SEED_TASKS, fill, load_seed_file, seed_task_rows
from compeff.train.answer_head import answer_forward
from compeff.train.logit_kd import collate, kd_features, kd_term, teacher_feature


def test_answer_only_head_gives_the_models_own_loss_and_gradients(tiny_lm):
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    rows = []
    for prompt, answer in (("a long prompt about a slow film " * 3, "negative"), ("fun", "a positive one")):
        full = tok(prompt + answer)["input_ids"]
        start = len(tok(prompt)["input_ids"])
        rows.append(teacher_feature(full, start, [], [], []))
    batch = collate(tok.pad_token_id)(rows)
    batch.pop("teacher_ids"), batch.pop("teacher_logprobs")
    reference = model(**batch)  # the model's own loss over the full logits
    reference.loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, logits, columns = answer_forward(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(reference.loss.item(), rel=1e-5)
    assert logits.shape[1] == len(columns) < batch["input_ids"].shape[1]  # the head saw fewer columns
    for p, g in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)


def label_sample(tok, user: str, probs: dict[str, float]) -> tuple[dict, list[int]]:
    """The kd feature of one closed-task sample answered "positive" with ``probs``, and the positions that
    carry teacher information (the sample must not be refused)."""
    row = {"id": "s", "messages": [{"role": "user", "content": user},
                                   {"role": "assistant", "content": "positive"}], "label_probs": probs}  # fmt: skip
    pair = {"prompt": row["messages"][:1], "completion": row["messages"][1:]}
    features, refused, _ = kd_features(tok, [row], [pair], max_length=128)
    assert not refused
    f = features[0]
    return f, f["teacher_pos"].tolist()


def test_label_kd_puts_the_distribution_at_the_first_answer_token(tiny_lm):
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    f, informed = label_sample(tok, "Label it: fine film", {"negative": 0.2, "neutral": 0.1, "positive": 0.7})
    start = f["completion_mask"].index(1)
    assert informed == [start]  # only the answer's first token carries the teacher's distribution
    assert f["input_ids"][start] in f["teacher_ids"][0]  # the answer's own first token is among them
    mass = sum(math.exp(v) for v in f["teacher_logprobs"][0] if np.isfinite(v))
    assert mass == pytest.approx(1.0)
    # the KL term at that token against a student whose distribution we set by hand
    batch = collate(tok.pad_token_id)([f])
    logits = torch.full((1, 1, AutoModelForCausalLM.from_pretrained(tiny_lm).config.vocab_size), -1e4)
    ids = batch["teacher_ids"][:, start]
    lps = batch["teacher_logprobs"][:, start]
    for j, v in zip(ids[0].tolist(), lps[0].tolist(), strict=True):
        if math.isfinite(v):
            logits[0, 0, j] = v  # the student equals the teacher there: KL 0
    kl, informed = kd_term(logits, ids[:, None], lps[:, None], 1.0)
    assert informed.item() == 1 and kl.item() == pytest.approx(0.0, abs=1e-5)


def test_seed_tasks_and_their_wordings(tmp_path):
    rows = seed_task_rows(list(SEED_TASKS))
    assert {r["name"] for r in rows} == set(SEED_TASKS) and all(len(r["wordings"]) >= 2 for r in rows)
    from compeff.evaluate.wordings import BUILTIN_WORDINGS

    ruler = {w.template for w in BUILTIN_WORDINGS.values()}
    assert not ruler & {w for r in rows for w in r["wordings"]}  # the ruler's wordings stay unseen
    # and at least two of its default wordings share no sentence with any seed wording (the others may
    # share "Answer with one word.": docs/benchmarks.md reports the student on each wording)
    from compeff.evaluate.wordings import ZERO_SHOT_DEFAULT

    def sentences(template: str) -> set[str]:
        return {
            s.strip().lower()
            for s in re.split(r"(?<=[.?!:])\s|\n", template)
            if "{" not in s and len(s.split()) > 2
        }

    seen = set().union(*(sentences(w) for r in rows for w in r["wordings"]))
    distinct = [n for n in ZERO_SHOT_DEFAULT if not sentences(BUILTIN_WORDINGS[n].template) & seen]
    assert len(distinct) >= 2, distinct
    texts = [{"id": f"t{i}", "text": f"text {i}"} for i in range(40)]
    plan = plan_pairings(rows, len(texts), 60, 2, 42)
    prompt = pairing_prompts({r["id"]: r for r in rows}, texts)
    used = set()
    for p in plan:
        task = next(r for r in rows if r["id"] == p.task_id)
        wording = task["wordings"][wording_index(p.id, len(task["wordings"]))]
        assert prompt(p) == fill(wording, task["labels"], texts[p.text_index]["text"])
        used.add((task["id"], wording))
    assert len(used) > len(rows)  # several wordings per task in one plan
    extra = tmp_path / "mine.yaml"
    extra.write_text(
        "- name: stance\n  labels: [against, favor]\n  wordings: ['Stance of {text}: {labels_or}?']\n"
    )
    assert seed_task_rows(["polarity"], str(extra))[-1]["labels"] == ["against", "favor"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: x\n  labels: [a]\n  wordings: ['{text}']\n")
    from compeff.data import DataError

    with pytest.raises(DataError, match="at least two"):
        load_seed_file(str(bad))


@pytest.fixture(scope="module")
def label_teacher(tiny_lm, tmp_path_factory):
    """The tiny LM taught for a few steps to answer the seed polarity tasks with a label word (its top-20
    then lists the labels; its confidence varies with the text)."""
    from compeff.train.sft import run_sft_stage

    root = tmp_path_factory.mktemp("label-teacher")
    rows = seed_task_rows(["polarity", "polarity3"])
    lines = []
    for i in range(48):
        task = rows[i % 2]
        label = task["labels"][(i // 2) % len(task["labels"])]
        text = f"the film {i} was {['dull', 'fine', 'great'][(i // 2) % 3]}"
        wording = task["wordings"][i % len(task["wordings"])]
        messages = [{"role": "user", "content": fill(wording, task["labels"], text)},
                    {"role": "assistant", "content": label}]  # fmt: skip
        lines.append(json.dumps({"id": f"t{i}", "messages": messages}) + "\n")
    (root / "train.jsonl").write_text("".join(lines))
    recipe = load_recipe(None, [f"run.dir={root}", "run.name=t", f"student.model={tiny_lm}",
                                f"sft.input={root / 'train.jsonl'}", "sft.max_steps=30",
                                "sft.learning_rate=3e-3", "sft.logging_steps=30"])  # fmt: skip
    run_sft_stage(recipe, progress=False)
    return recipe.run_dir / "sft" / "model"


def test_generate_reads_closed_tasks_as_label_distributions(tmp_path, label_teacher):
    """generate with the tiny local teacher on seed tasks only: each answer is the argmax of the teacher's
    label distribution, computed as the ruler computes it; low-confidence answers are dropped and counted."""
    from compeff.synth.generate import run_generate_stage

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"u{i}", "text": f"the film {i} was slow and fun"}) + "\n"
                             for i in range(12)))  # fmt: skip
    overrides = [
        f"run.dir={tmp_path / 'runs'}",
        "run.name=labels",
        f"teacher.model={label_teacher}",
        "teacher.cache=null",
        f"data.user_texts=[{texts}]",
        "generate.n_samples=12",
        "tasks.seed_tasks=[polarity, polarity3]",
    ]
    recipe = load_recipe(None, overrides)
    tasks_dir = recipe.run_dir / "tasks"
    tasks_dir.mkdir(parents=True)
    rows = seed_task_rows(["polarity", "polarity3"])
    (tasks_dir / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_generate_stage(recipe, progress=False)
    out = list(iter_jsonl(recipe.run_dir / "generate" / "data.jsonl"))
    assert len(out) == 12
    scorer = HFLabelScorer(str(label_teacher), chat_template=True)
    by_id = {r["id"]: r for r in rows}
    for sample in out:
        labels = by_id[sample["task_id"]]["labels"]
        probs = sample["label_probs"]
        assert list(probs) == labels and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert sample["messages"][-1]["content"] == max(probs, key=probs.get)
        assert sample["teacher_confidence"] == max(probs.values())
        # the ruler's arithmetic on the full distribution: the top-20 cut keeps the same label order here
        direct = label_distribution(scorer.label_log_mass([sample["messages"][0]["content"]], labels))[0]
        assert int(np.argmax(direct)) == labels.index(sample["messages"][-1]["content"])
    threshold = float(np.median([s["teacher_confidence"] for s in out]))
    strict = load_recipe(None, [*overrides, "run.name=strict", f"generate.min_confidence={threshold}"])
    (strict.run_dir / "tasks").mkdir(parents=True)
    (strict.run_dir / "tasks" / "tasks.jsonl").write_text((tasks_dir / "tasks.jsonl").read_text())
    run_generate_stage(strict, progress=False)
    report = json.loads((strict.run_dir / "generate" / "report.json").read_text())
    kept = sum(1 for s in out if s["teacher_confidence"] >= threshold)
    assert report["samples"] == kept and report["rejected_low_confidence"] == 12 - kept > 0


def test_label_soft_targets_sit_where_the_label_words_part(tiny_lm):
    """A template that opens the assistant turn with tokens of its own (an empty think block): the teacher's
    distribution goes where the label words begin, not on the template's tokens."""
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{{ 'think done\\n' }}{% endif %}"
        "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    f, informed = label_sample(tok, "fine film", {"negative": 0.4, "positive": 0.6})
    assert len(informed) == 1
    at = informed[0]
    assert tok.decode(f["input_ids"][at:]).startswith("positive")  # the label word, not "think"
    assert at > f["completion_mask"].index(1)  # past the template's own tokens


def seed_task_runs(tmp_path, teacher, n: int, variants: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """generate on the two polarity seed tasks over n short texts, once per variant (run name -> extra
    overrides), in one run folder; run name -> sample id -> record."""
    from compeff.synth.generate import run_generate_stage

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"u{i}", "text": f"a {['dull', 'great'][i % 2]} film {i}"}) + "\n"
                             for i in range(n)))  # fmt: skip
    base = [f"run.dir={tmp_path / 'runs'}", f"teacher.model={teacher}", "teacher.cache=null",
            f"data.user_texts=[{texts}]", f"generate.n_samples={n}", "tasks.seed_tasks=[polarity, polarity3]"]  # fmt: skip
    rows = seed_task_rows(["polarity", "polarity3"])
    results = {}
    for name, extra in variants.items():
        recipe = load_recipe(None, [*base, f"run.name={name}", *extra])
        (recipe.run_dir / "tasks").mkdir(parents=True)
        (recipe.run_dir / "tasks" / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run_generate_stage(recipe, progress=False)
        results[name] = {r["id"]: r for r in iter_jsonl(recipe.run_dir / "generate" / "data.jsonl")}
    return results


def test_prompt_ensemble_averages_the_wordings(tmp_path, label_teacher):
    """generate.label_ensemble: 3: each closed sample's distribution is the mean of its own wording's (the
    run without the ensemble) and the other wordings' (kept in generate/ensemble/, resumable)."""
    results = seed_task_runs(tmp_path, label_teacher, 8, {"plain": [], "ens": ["generate.label_ensemble=3"]})
    others: dict[str, list[dict[str, float]]] = {}
    for r in iter_jsonl(tmp_path / "runs" / "ens" / "generate" / "ensemble" / "data.jsonl"):
        others.setdefault(r["group"], []).append(r["label_probs"])
    assert set(results["ens"]) == set(results["plain"]) and len(others) == 8
    for sid, sample in results["ens"].items():
        own = results["plain"][sid]["label_probs"]
        assert sample["label_wordings"] == 1 + len(others[sid]) == 3  # both tasks have three wordings
        for label, p in sample["label_probs"].items():
            expected = (own[label] + sum(d[label] for d in others[sid])) / 3
            assert p == pytest.approx(expected, abs=2e-6)
        assert sample["messages"][-1]["content"] == max(sample["label_probs"], key=sample["label_probs"].get)


def test_calibration_divides_by_each_templates_content_free_answers(tmp_path, label_teacher):
    """generate.calibrate: every prompt template is asked the three content-free inputs once (in
    generate/calibration/), and each sample's distribution is its uncalibrated one (the run without
    calibration) divided by its template's mean content-free distribution, renormalised."""
    from compeff.evaluate.classification import CONTENT_FREE
    from compeff.synth.instructions import wording_index
    from compeff.synth.label_calls import TEXT_SLOT, template_key

    by_task = {r["id"]: r for r in seed_task_rows(["polarity", "polarity3"])}
    results = seed_task_runs(tmp_path, label_teacher, 10, {"plain": [], "cal": ["generate.calibrate=true"]})
    free: dict[str, list[dict[str, float]]] = {}
    for r in iter_jsonl(tmp_path / "runs" / "cal" / "generate" / "calibration" / "data.jsonl"):
        free.setdefault(r["template"], []).append(r["label_probs"])
    used = {(s["task_id"], wording_index(sid, len(by_task[s["task_id"]]["wordings"])))
            for sid, s in results["plain"].items()}  # fmt: skip
    assert len(free) == len(used) and all(len(v) == len(CONTENT_FREE) for v in free.values())
    for sid, sample in results["cal"].items():
        raw = results["plain"][sid]["label_probs"]
        labels = list(raw)
        task = by_task[sample["task_id"]]
        # the sample's own template: its wording with the text taken out
        own = template_key(
            fill(task["wordings"][wording_index(sid, len(task["wordings"]))], labels, TEXT_SLOT)
        )
        prior = np.mean([[a[label] for label in labels] for a in free[own]], axis=0)
        expected = np.array([raw[label] for label in labels]) / np.maximum(prior, 1e-3)
        expected /= expected.sum()
        assert [sample["label_probs"][label] for label in labels] == pytest.approx(
            expected.tolist(), abs=2e-6
        )
        assert sample["calibrated"] is True
        assert sample["messages"][-1]["content"] == max(sample["label_probs"], key=sample["label_probs"].get)
    assert sum(abs(results["cal"][s]["label_probs"][k] - v) for s in results["plain"]
               for k, v in results["plain"][s]["label_probs"].items()) > 0.01  # fmt: skip
    with pytest.raises(ConfigError, match="label_scoring"):
        load_recipe(None, ["generate.calibrate=true", "generate.label_scoring=false"])


def test_batch_calibration_divides_by_the_tasks_mean_over_the_run(tmp_path, label_teacher):
    """generate.batch_calibrate: every closed sample's label question is answered first (generate/labels/),
    then each distribution (the run without calibration) is divided by its task's mean distribution over
    all of the run's samples, renormalised, and its argmax is the answer."""
    from compeff.runs import read_manifest
    from compeff.synth.generate import batch_prior_key, run_generate_stage

    n = 16
    results = seed_task_runs(
        tmp_path, label_teacher, n, {"plain": [], "batch": ["generate.batch_calibrate=true"]}
    )
    folder = tmp_path / "runs" / "batch" / "generate"
    asked = list(iter_jsonl(folder / "labels" / "data.jsonl"))
    assert sorted(r["id"] for r in asked) == sorted(results["plain"]) and len(asked) == n
    manifest = read_manifest(folder)
    assert manifest["call"]["asked"] == 0  # no closed sample asked twice
    assert manifest["batch_calibrated"] == {"written": n, "not_written": 0}
    plain = results["plain"]
    assert set(results["batch"]) == set(plain)
    by_task = {r["id"]: r for r in seed_task_rows(["polarity", "polarity3"])}
    key = {sid: batch_prior_key(sid, by_task[s["task_id"]]) for sid, s in plain.items()}
    for sid, sample in results["batch"].items():
        labels = list(plain[sid]["label_probs"])
        same_task = [
            s["label_probs"] for o, s in plain.items() if key[o] == key[sid]
        ]  # same task and wording
        prior = np.mean([[d[label] for label in labels] for d in same_task], axis=0)
        expected = np.array([plain[sid]["label_probs"][label] for label in labels]) / np.maximum(prior, 1e-3)
        expected /= expected.sum()
        got = [sample["label_probs"][label] for label in labels]
        assert got == pytest.approx(expected.tolist(), abs=2e-6)
        assert sample["batch_calibrated"] is True
        assert sample["messages"][-1]["content"] == max(sample["label_probs"], key=sample["label_probs"].get)
        assert sample["messages"][:-1] == plain[sid]["messages"][:-1]
        assert sample["label_before_batch_calibration"] == plain[sid]["messages"][-1]["content"]
    changed = Counter(s["task_id"] for sid, s in results["batch"].items()
                      if s["messages"][-1]["content"] != plain[sid]["messages"][-1]["content"])  # fmt: skip
    assert sum(changed.values()) > 0  # the tiny teacher is biased: calibration moves some of its labels
    report = json.loads((folder / "report.json").read_text())
    totals = Counter(s["task_id"] for s in results["batch"].values())
    assert report["batch_calibration_changed"] == {
        t: {"changed": changed[t], "of": totals[t]} for t in totals
    }
    assert "## Labels batch calibration changed" in (folder / "report.md").read_text()
    # a resumed run keeps the priors it wrote with: the last records cut off as by a kill, the rerun
    # writes them back identical, asking nothing new
    data = folder / "data.jsonl"
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[:-5]))
    stored = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**stored, "status": "interrupted"}))
    texts = tmp_path / "texts.jsonl"
    recipe = load_recipe(None, [f"run.dir={tmp_path / 'runs'}", f"teacher.model={label_teacher}", "teacher.cache=null",
                                f"data.user_texts=[{texts}]", f"generate.n_samples={n}", "run.name=batch",
                                "tasks.seed_tasks=[polarity, polarity3]", "generate.batch_calibrate=true"])  # fmt: skip
    run_generate_stage(recipe, progress=False)
    assert sorted(data.read_bytes().splitlines()) == sorted(b"".join(lines).splitlines())
    assert len(list(iter_jsonl(folder / "labels" / "data.jsonl"))) == n
    assert (
        json.loads((folder / "report.json").read_text())["batch_calibration_changed"]
        == report["batch_calibration_changed"]
    )  # the resumed run's report counts the records read back and the new ones alike
    with pytest.raises(ConfigError, match="label_scoring"):
        load_recipe(None, ["generate.batch_calibrate=true", "generate.label_scoring=false"])


def test_labels_bench_counts_hits_per_wording_ensemble_and_threshold(tmp_path, label_teacher):
    from compeff.bench.labels import THRESHOLDS, run_labels_bench

    results = run_labels_bench(str(label_teacher), imdb=8, tweeteval=9, out_dir=tmp_path)
    for spec, n_words in (("imdb:train", 3), ("tweeteval_sentiment:validation", 3)):
        r = results[spec]
        assert len(r["wordings"]) == n_words and 0 <= r["ensemble"] <= 1
        assert len(r["calibrated_wordings"]) == n_words and 0 <= r["calibrated_ensemble"] <= 1
        assert len(r["batch_calibrated_wordings"]) == n_words
        kept = [r["confidence_ensemble"][f"{t:g}"]["kept"] for t in THRESHOLDS]
        assert kept == sorted(kept, reverse=True)  # a higher threshold keeps fewer
    assert json.loads((tmp_path / "labels_bench.json").read_text()) == results
    # candidate wordings replace a seed task's own, and each is scored as the built-in ones are
    first = SEED_TASKS["polarity"]["wordings"][0]
    candidates = tmp_path / "candidates.yaml"
    candidates.write_text(yaml.safe_dump([{"name": "polarity", "labels": ["negative", "positive"],
                                           "wordings": [first, "Mood of {text}: {labels_or}?"]}]))  # fmt: skip
    again = run_labels_bench(str(label_teacher), imdb=8, tweeteval=9, out_dir=tmp_path / "c",
                             seed_tasks_file=str(candidates))  # fmt: skip
    assert again["imdb:train"]["wording_texts"] == [first, "Mood of {text}: {labels_or}?"]
    assert again["imdb:train"]["wordings"][0] == results["imdb:train"]["wordings"][0]
    assert again["tweeteval_sentiment:validation"] == results["tweeteval_sentiment:validation"]


def test_a_label_question_answered_without_a_label_is_kept_as_rejected(tmp_path):
    """Batch calibration: a closed sample whose label question the sub-stage rejected (no label in the
    answer) is a rejected sample with that reason; one never answered is a failed call, asked again."""
    from compeff.runs import Stage
    from compeff.synth.generate import batch_calibrated_records
    from compeff.teachers.base import ChatRequest

    requests = [ChatRequest(id=f"s{i}", messages=[{"role": "user", "content": "q"}],
                            meta={"task_id": "t", "text_id": f"x{i}"}) for i in range(4)]  # fmt: skip
    own = {"s0": [{"label_probs": {"a": 0.8, "b": 0.2}}], "s1": [{"label_probs": {"a": 0.6, "b": 0.4}}]}
    reason = "rejected: no label word among the teacher's top-20 log-probabilities"
    stage = Stage.open(tmp_path, "generate", config={}, inputs={})
    with stage:
        ok, bad = batch_calibrated_records(
            stage, requests, {r.id: "t" for r in requests}, own,
            lambda probs, template: probs, lambda sample_id, probs: (probs, {}),
            lambda probs, fields: (max(probs, key=probs.get), {**fields, "label_probs": probs}),
            lambda request, answer, fields: {"id": request.id, "answer": answer, **fields},
            {"s2": {"id": "s2", "kind": "rejected", "reason": reason}},
        )  # fmt: skip
    # prior (0.7, 0.3): s0 0.8/0.7 > 0.2/0.3 -> a; s1 0.6/0.7 < 0.4/0.3 -> b
    assert [(r["id"], r["answer"]) for r in ok] == [("s0", "a"), ("s1", "b")]
    assert bad[0] == {"id": "s2", "reason": reason, "kind": "rejected", "task_id": "t", "text_id": "x2"}
    assert bad[1]["id"] == "s3" and bad[1]["kind"] == "failed" and "asks it again" in bad[1]["reason"]
