"""compeff bench distill's pieces that need no model: the three training subsets and the table."""

from __future__ import annotations

import json

import pytest

from compeff.bench.distill import distillation_subsets, markdown_table, run_distill_bench
from compeff.config import ConfigError
from compeff.runs import iter_jsonl


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_subsets_same_size_from_generate_and_carry_the_logprobs(tmp_path):
    generated = [{"id": f"g{i}", "messages": [{"role": "user", "content": str(i)}], "extra": i,
                  "teacher_top_logprobs": {"n": i}} for i in range(10)]  # fmt: skip
    write(tmp_path / "generate" / "data.jsonl", generated)
    write(tmp_path / "sample" / "data.jsonl", generated[:4])
    paths = distillation_subsets(tmp_path, tmp_path / "sets", seed=1)
    sets = {name: list(iter_jsonl(p)) for name, p in paths.items()}
    assert [len(sets[n]) for n in ("selected", "random", "all")] == [4, 4, 10]
    assert {r["id"] for r in sets["random"]} <= {r["id"] for r in generated}
    assert all(set(r) == {"id", "messages", "teacher_top_logprobs"} for r in sets["all"])
    again = distillation_subsets(tmp_path, tmp_path / "sets", seed=1)  # same seed: same random subset
    assert list(iter_jsonl(again["random"])) == sets["random"]


def test_table_shows_agreement_and_folds_seeds():
    from compeff.bench.distill import with_seed_means

    cell = {"accuracy": 50.0, "macro_f1": 33.3, "agreement": None, "n": 10}
    rows = [{"row": "teacher", "samples": None, "train_s": None, "sets": {"a": cell}}]
    for k, acc in enumerate((60.0, 70.0)):
        rows.append({"row": f"KD, selected (seed {k + 1})", "group": "KD, selected", "samples": 4, "train_s": 10.0 + k,
                     "sets": {"a": {"accuracy": acc, "macro_f1": 40.0, "agreement": 80.0, "n": 10}}})  # fmt: skip
    table = markdown_table(with_seed_means(rows))
    assert "| teacher | - | 50.0 / 33.3 / - | - |" in table
    assert "| KD, selected (mean of 2 seeds) | 4 | 65.0 +- 7.1 / 40.0 / 80.0 | 10 |" in table
    for k, acc in enumerate((50.0, 54.0)):
        rows.append({"row": f"SFT, random 10% (draw {k + 1})", "group": "SFT, random 10%", "spread": "draws",
                     "samples": 5 + 2 * k, "train_s": 3.0, "sets": {"a": {**cell, "accuracy": acc, "agreement": 60.0}}})  # fmt: skip
    assert "| SFT, random 10% (mean of 2 draws) | 6 | 52.0 +- 2.8 / 33.3 / 60.0 | 3 |" in markdown_table(
        with_seed_means(rows)
    )


def test_seed_means_fold_the_calibrated_agreement_only_when_every_member_has_it():
    from compeff.bench.distill import with_seed_means

    def member(k, calibrated):
        cell = {"accuracy": 50.0, "macro_f1": 40.0, "agreement": 70.0, "agreement_batch_calibrated": calibrated,
                "n": 10}  # fmt: skip
        return {"row": f"SFT (seed {k})", "group": "SFT", "samples": 4, "train_s": 1.0, "sets": {"a": cell}}

    both = with_seed_means([member(1, 40.0), member(2, 45.0)])[0]["sets"]["a"]
    assert both["agreement_batch_calibrated"] == 42.5
    assert "/ 70.0 (42.5) |" in markdown_table(with_seed_means([member(1, 40.0), member(2, 45.0)]))
    one_missing = with_seed_means([member(1, 40.0), member(2, None)])[0]["sets"]["a"]
    assert one_missing["agreement_batch_calibrated"] is None  # no mean of one seed passed off as of two
    assert (
        markdown_table(with_seed_means([member(1, 40.0), member(2, None)]))
        .splitlines()[-1]
        .endswith("/ 40.0 / 70.0 | 1 |")
    )


def test_a_scored_row_is_printed_in_one_line_before_the_table():
    from compeff.bench.distill import row_line

    row = {"row": "SFT", "sets": {"imdb:test": {"accuracy": 55.0, "agreement": 60.25},
                                  "tweeteval_sentiment:test": {"accuracy": 30.0, "agreement": None}}}  # fmt: skip
    assert row_line(row) == "imdb:test 55.0 (agree 60.2), tweeteval_sentiment:test 30.0"
    row["sets"]["imdb:test"]["agreement_batch_calibrated"] = 51.0
    row["sets"]["tweeteval_sentiment:test"]["batch_calibrated"] = {"accuracy": 37.04, "macro_f1": 30.0}
    assert row_line(row) == (
        "imdb:test 55.0 (agree 60.2, calibrated 51.0), tweeteval_sentiment:test 30.0 (batch-calibrated 37.0)"
    )


def test_unknown_loss_or_subset_is_one_line_and_exit_2(tmp_path):
    import subprocess

    from conftest import compeff_cmd

    with pytest.raises(ConfigError, match="unknown --loss / --subset dpo"):
        run_distill_bench(losses=("sft", "dpo"), out_dir=tmp_path)
    done = subprocess.run(compeff_cmd("bench", "distill", "--subset", "half", "--out", str(tmp_path)),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "unknown --loss / --subset half" in done.stderr
    assert "Traceback" not in done.stderr


def test_fraction_subsets_select_the_hardest_share_and_a_random_one_of_its_size(tmp_path):
    from compeff.bench.distill import fraction_subsets
    from compeff.config import load_recipe

    recipe = load_recipe(
        None, [f"run.dir={tmp_path}", "run.name=b", "sample.method=hard", "sample.group=global"]
    )
    rows = [{"id": f"g{i}", "messages": [{"role": "user", "content": str(i)}], "task_id": "t",
             "difficulty": {"rank": i / 40}, "label_probs": {"a": 0.5, "b": 0.5}} for i in range(40)]  # fmt: skip
    write(recipe.run_dir / "score" / "data.jsonl", rows)
    paths = fraction_subsets(recipe, tmp_path / "sets", (0.1, 0.25))
    chosen = [r["id"] for r in iter_jsonl(paths["selected-0.1"])]
    assert sorted(chosen) == ["g36", "g37", "g38", "g39"]  # the hardest tenth
    assert len(list(iter_jsonl(paths["random-0.25"]))) == len(list(iter_jsonl(paths["selected-0.25"]))) == 10
    assert all("label_probs" in r for r in iter_jsonl(paths["random-0.1"]))
    soft = load_recipe(None, [f"run.dir={tmp_path}", "run.name=b", "sample.group=global"])
    drawn = fraction_subsets(soft, tmp_path / "soft", (0.25,), draws=3)
    assert sorted(drawn) == sorted(f"{k}-0.25{s}" for k in ("selected", "random") for s in ("", "-d1", "-d2"))
    picks = [frozenset(r["id"] for r in iter_jsonl(drawn[f"{k}-0.25{s}"])) for k in ("selected", "random")
             for s in ("", "-d1", "-d2")]  # fmt: skip
    assert len(set(picks)) == 6  # every draw is another subset
    for s in ("", "-d1", "-d2"):
        assert len(list(iter_jsonl(drawn[f"random-0.25{s}"]))) == len(
            list(iter_jsonl(drawn[f"selected-0.25{s}"]))
        )
    once = fraction_subsets(soft, tmp_path / "once", (0.25,))  # draw 0 is the subset of a one-draw bench
    assert all(once[k].read_text() == drawn[k].read_text() for k in ("selected-0.25", "random-0.25"))
    with pytest.raises(ConfigError, match="--draws > 1 needs sample.method soft or random"):
        fraction_subsets(recipe, tmp_path / "hard", (0.25,), draws=2)
    from compeff.select.sample_stage import select_rows

    seeded = load_recipe(None, [f"run.dir={tmp_path}", "run.name=b", "sample.group=global", "sample.seed=5"])
    first = fraction_subsets(seeded, tmp_path / "seeded", (0.25,))  # the sample stage's seed, not run.seed
    keep = select_rows(rows, seeded.sample, 0.25, 5)
    assert [r["id"] for r in iter_jsonl(first["selected-0.25"])] == [r["id"] for r, k in zip(rows, keep) if k]
    assert first["selected-0.25"].read_text() != once["selected-0.25"].read_text()


def test_gold_subset_answers_with_the_true_label_and_counts_the_teachers_hits(tmp_path):
    from compeff.bench.distill import gold_subset

    def sample(i, task, text, answer, conf):
        return {"id": f"g{i}", "task_id": task, "text_id": text, "teacher_confidence": conf,
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}  # fmt: skip

    write(tmp_path / "generate" / "data.jsonl", [
        sample(0, "seed:polarity", "imdb:1", "positive", 0.9),        # right
        sample(1, "seed:polarity", "imdb:2", "positive", 0.55),       # wrong
        sample(2, "seed:polarity", "tweeteval_sentiment:3", "negative", 0.9),  # neutral: not in 2-way labels
        sample(3, "seed:polarity3", "tweeteval_sentiment:3", "neutral", 0.8),  # right
        sample(4, "seed:emotion", "imdb:1", "joy", 0.9),              # no gold for emotion
    ])  # fmt: skip
    gold = {"imdb:1": "positive", "imdb:2": "negative", "tweeteval_sentiment:3": "neutral"}
    path, quality = gold_subset(tmp_path, tmp_path / "sets", gold)
    rows = list(iter_jsonl(path))
    assert [r["id"] for r in rows] == ["g0", "g1", "g3"]
    assert [r["messages"][-1]["content"] for r in rows] == ["positive", "negative", "neutral"]
    assert quality["samples"] == 3 and quality["teacher_right"] == 2 / 3
    assert quality["teacher_right_conf>=0.6"] == [1.0, 2]


def test_a_trained_model_is_scored_once_whatever_its_row_is_called():
    from compeff.bench.distill import eval_cache_name

    one_seed = {"row": "SFT, selected", "stage": "sft-sft-selected"}
    first_of_three = {"row": "SFT, selected (seed 1)", "stage": "sft-sft-selected"}
    second_of_three = {"row": "SFT, selected (seed 2)", "stage": "sft-sft-selected-s1"}
    assert eval_cache_name(one_seed) == eval_cache_name(first_of_three) == "sft-sft-selected.json"
    assert eval_cache_name(second_of_three) != eval_cache_name(first_of_three)
    assert eval_cache_name({"row": "student before training"}) == "student-before-training.json"


def test_rows_agree_with_the_teachers_plain_and_batch_calibrated_labels(tmp_path, tiny_lm, capsys):
    """The bench scores the teacher once with its batch-calibrated labels kept beside its plain ones (an
    older cache without them is scored again), and every row's agreement is read against both."""
    import numpy as np

    from compeff.bench.distill import score_model, summarise_row
    from compeff.config import load_recipe
    from compeff.evaluate.classification import LabelledSet
    from compeff.evaluate.ruler import agreement

    words = ["dull", "fine", "great", "slow", "long", "fun", "bad", "good"]
    texts = [f"a {w} film, number {i}" for i, w in enumerate(words * 2)]
    data = LabelledSet("toy", texts, [i % 2 for i in range(len(texts))], ["negative", "positive"], [], [])
    sets = {"toy": data}
    recipe = load_recipe(None, [f"run.dir={tmp_path}", "eval.chat_template=false", "eval.k_shot=0"])
    cache = tmp_path / "eval" / "teacher.json"
    teacher = score_model(str(tiny_lm), sets, recipe, cache, need_calibrated=True)
    calibrated = teacher["toy"]["batch_calibrated_preds"]
    runs = len(teacher["toy"]["preds"])  # progress while it scores: one count per set and wording
    assert f"scoring teacher (set x wording): {runs}/{runs} done" in capsys.readouterr().err
    assert set(calibrated) == set(teacher["toy"]["preds"]) and all(
        len(p) == len(texts) for p in calibrated.values()
    )
    made = cache.stat().st_mtime_ns
    assert score_model(str(tiny_lm), sets, recipe, cache) == teacher and cache.stat().st_mtime_ns == made
    assert "scoring" not in capsys.readouterr().err  # reused: nothing scored
    stored = json.loads(cache.read_text())  # a cache written before the calibrated labels
    del stored["sets"]["toy"]["batch_calibrated_preds"]
    cache.write_text(json.dumps(stored))
    assert score_model(str(tiny_lm), sets, recipe, cache) == stored["sets"]  # a student's: reused as it is
    again = score_model(
        str(tiny_lm), sets, recipe, cache, need_calibrated=True
    )  # the teacher's: scored again
    assert again["toy"]["batch_calibrated_preds"] == calibrated
    rewritten = json.loads(cache.read_text())  # and written back: the next bench reads it as it is
    assert rewritten["sets"]["toy"]["batch_calibrated_preds"] == calibrated
    made = cache.stat().st_mtime_ns
    assert score_model(str(tiny_lm), sets, recipe, cache, need_calibrated=True) == again
    assert cache.stat().st_mtime_ns == made
    rewritten["calibration"] = 0  # labels of an older calibration arithmetic: scored again
    cache.write_text(json.dumps(rewritten))
    score_model(str(tiny_lm), sets, recipe, cache, need_calibrated=True)
    assert json.loads(cache.read_text())["calibration"] != 0
    student = {"toy": {"preds": {w: [1 - p for p in preds] for w, preds in teacher["toy"]["preds"].items()}}}
    cells = summarise_row(student, sets, teacher)["toy"]
    assert cells["agreement"] == 0.0  # every label flipped
    expected = np.mean([agreement(student["toy"]["preds"][w], calibrated[w]) for w in calibrated])
    assert expected > 0  # calibration moved some of the teacher's labels away from its plain ones
    assert cells["agreement_batch_calibrated"] == pytest.approx(100 * expected)
    assert set(cells["wordings"]) == set(calibrated)
    own = summarise_row(teacher, sets, None)["toy"]
    assert own["agreement_batch_calibrated"] is None
    truth = data.labels  # the teacher row also scores its own calibrated labels
    own_acc = np.mean([np.mean([p == t for p, t in zip(preds, truth)]) for preds in calibrated.values()])
    assert own["batch_calibrated"]["accuracy"] == pytest.approx(100 * own_acc)
    assert cells["batch_calibrated"] is None  # a student's row does not
    from compeff.bench.distill import with_calibrated_teacher

    rows = with_calibrated_teacher(
        [
            {"row": "teacher", "samples": None, "train_s": None, "sets": {"toy": own}},
            {"row": "student", "samples": 3, "train_s": 1.0, "sets": {"toy": cells}},
        ]  # fmt: skip
    )
    assert [r["row"] for r in rows] == ["teacher", "teacher, batch-calibrated on the test texts", "student"]
    table = markdown_table(rows)
    assert f"/ 0.0 ({100 * expected:.1f})" in table and "agree teacher (calibrated)" in table
    assert f"| teacher, batch-calibrated on the test texts | - | {100 * own_acc:.1f} / " in table
