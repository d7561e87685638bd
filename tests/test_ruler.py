"""The ruler on real tiny models: label evidence, distribution, accuracy, agreement and calibration where
the answer is known in advance (a model with its final norm zeroed gives every token the same
probability, so each label's mass is its number of first tokens over the vocabulary size)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from compeff.config import load_recipe
from compeff.evaluate.classification import (
    HFLabelScorer,
    label_distribution,
    label_owners,
    local_first_tokens,
)
from compeff.evaluate.eval_stage import run_eval_stage
from compeff.evaluate.ruler import agreement
from compeff.evaluate.wordings import BUILTIN_WORDINGS

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def uniform_lm(tiny_lm, tmp_path_factory) -> Path:
    """The tiny LM with its final norm zeroed: every next-token probability is 1 / vocabulary size."""
    out = tmp_path_factory.mktemp("uniform-lm")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.model.norm.weight.data.zero_()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(out)
    return out


def test_label_mass_of_a_uniform_model_counts_its_tokens(uniform_lm):
    tok = AutoTokenizer.from_pretrained(uniform_lm)
    owners = label_owners(local_first_tokens(tok, LABELS), LABELS)
    counts = np.bincount(list(owners.values()), minlength=len(LABELS))
    vocab = AutoModelForCausalLM.from_pretrained(uniform_lm).config.vocab_size
    turns = [BUILTIN_WORDINGS[w].render("a slow film", LABELS) for w in ("question", "author")]
    mass = HFLabelScorer(str(uniform_lm), chat_template=True).label_log_mass(turns, LABELS)
    assert np.allclose(mass, np.log(counts / vocab)[None, :].repeat(2, 0), atol=1e-5)
    assert np.allclose(label_distribution(mass), counts / counts.sum(), atol=1e-6)


def _write_set(tmp_path: Path, labels: list[int]) -> Path:
    path = tmp_path / "set.jsonl"
    words = ["dull", "fine", "great", "slow", "long", "fun"]
    path.write_text(
        "".join(
            json.dumps({"id": f"x{i}", "text": f"{words[i % 6]} film {i}", "label": y}) + "\n"
            for i, y in enumerate(labels)
        )
    )
    return path


def test_eval_reports_each_wording_agreement_and_calibration(tmp_path, tiny_lm, uniform_lm):
    labels = [0] * 5 + [1] * 7 + [2] * 8
    data = _write_set(tmp_path, labels)
    recipe = load_recipe(
        None,
        [
            f"run.dir={tmp_path / 'runs'}",
            "run.name=ruler",
            f"teacher.model={uniform_lm}",
            f"student.model={tiny_lm}",
            f"eval.model={uniform_lm}",
            "eval.compare=[teacher, student]",
            f"eval.sets=[{data}]",
            f"eval.label_names=[{', '.join(LABELS)}]",
            "eval.chat_template=true",
            "eval.wordings=[question, text-first, {name: mine, template: 'Text: {text} Feeling ({labels})?'}]",
            "eval.calibrate=true",
        ],
    )
    results = run_eval_stage(recipe, progress=False)["results"]
    tok = AutoTokenizer.from_pretrained(uniform_lm)
    counts = np.bincount(
        list(label_owners(local_first_tokens(tok, LABELS), LABELS).values()), minlength=len(LABELS)
    )
    expected_label = int(np.argmax(counts))  # every text: the label with most first tokens
    teacher = results["comparison"]["teacher"]["sets"][str(data)]
    assert set(teacher["wordings"]) == {"question", "text-first", "mine"}
    share = labels.count(expected_label) / len(labels)
    for entry in teacher["wordings"].values():
        assert entry["accuracy"] == pytest.approx(share)
        assert entry["predicted_share"][LABELS[expected_label]] == 1.0
        # calibrated by content-free inputs the uniform model is uniform: ties go to the first label
        assert entry["calibrated"]["accuracy"] == pytest.approx(labels.count(0) / len(labels))
        assert "agreement" not in entry  # the teacher is the reference
    assert teacher["accuracy_std"] == pytest.approx(0.0, abs=1e-12)
    # the evaluated model is the teacher's weights: it agrees everywhere; the student by its own labels
    evaluated = results["sets"][str(data)]
    assert evaluated["agreement"] == 1.0
    student = results["comparison"]["student"]["sets"][str(data)]
    direct = HFLabelScorer(str(tiny_lm), chat_template=True)
    for name in ("question", "text-first"):
        turns = [BUILTIN_WORDINGS[name].render(f"{w} film {i}", LABELS) for i, w in _texts(len(labels))]
        preds, _ = direct.predict(turns, LABELS)
        assert student["wordings"][name]["agreement"] == pytest.approx(
            agreement(preds, [expected_label] * len(labels))
        )
        # batch-calibrated, the uniform teacher's texts all tie: the first label, everywhere
        assert student["wordings"][name]["agreement_batch_calibrated"] == pytest.approx(
            agreement(preds, [0] * len(labels))
        )
    assert math.isclose(student["accuracy"], np.mean([w["accuracy"] for w in student["wordings"].values()]))
    md = (recipe.run_dir / "eval" / "results.md").read_text()
    assert "calibrated" in md and "agreement with the teacher" in md
    # and against the teacher's batch-calibrated labels (arithmetic: the test below), in its own table
    assert 0.0 <= student["agreement_batch_calibrated"] <= 1.0
    assert set(student["wordings"]) == {
        w for w, e in student["wordings"].items() if "agreement_batch_calibrated" in e
    }
    assert "teacher / calibrated teacher" in md and "agreement_batch_calibrated" not in teacher
    assert "did not batch-calibrate" in md  # this recipe's chain taught the plain labels
    csv_lines = (recipe.run_dir / "eval" / "results.csv").read_text().splitlines()
    assert csv_lines[0].endswith(
        "batch_calibrated_accuracy,batch_calibrated_macro_f1,agreement_batch_calibrated"
    )
    # resumed from its rows: the same results without loading a model
    again = run_eval_stage(recipe, progress=False)["results"]
    assert again["comparison"]["student"]["sets"] == results["comparison"]["student"]["sets"]


def _texts(n: int) -> list[tuple[int, str]]:
    words = ["dull", "fine", "great", "slow", "long", "fun"]
    return [(i, words[i % 6]) for i in range(n)]


def test_no_label_is_a_miss_and_never_an_invented_label():
    from compeff.evaluate.classification import LabelledSet
    from compeff.evaluate.ruler import WordingRun, summarise_runs

    data = LabelledSet("s", ["a", "b", "c", "d"], [0, 1, 1, 0], ["negative", "positive"], [], [])
    inf = -np.inf
    mass = np.array([[-0.1, -2.0], [inf, inf], [-3.0, -0.2], [inf, inf]])  # two texts without evidence
    run = WordingRun("question", None, mass, content_free=np.array([[-0.5, -1.0]] * 3))
    assert run.preds == [0, -1, 1, -1]
    assert run.calibrated_preds()[1] == -1 and run.calibrated_preds()[3] == -1
    result = summarise_runs(data, [run], reference={("question", None): [0, 1, 1, 1]})
    entry = result["wordings"]["question"]
    assert entry["accuracy"] == 0.5 and entry["no_label"] == 2
    assert entry["macro_f1"] == pytest.approx(2 / 3)  # per label: precision 1, recall 1/2
    assert result["confusion"] == [[1, 0], [0, 1]]  # the misses are in no cell
    assert entry["agreement"] == 0.5  # no label never agrees


def test_custom_wordings_are_checked_when_the_recipe_loads():
    from compeff.config import ConfigError

    for bad, why in (
        ("[question, question]", "unique"),
        ("[{name: a, template: 'Sentiment ({labels})?'}]", "needs {text}"),
        ("[{name: a, template: '{text}'}]", "names the labels"),
        ("[{name: a, template: '{text} {labels}', k_shot: true}]", "leave {text} out"),
        ("[nonesuch]", "unknown wording"),
    ):
        with pytest.raises(ConfigError, match=re.escape(why)):
            load_recipe(None, [f"eval.wordings={bad}"])


def test_agreement_with_the_teachers_batch_calibrated_labels():
    """A teacher that says label 0 to every text still ranks them; divided by its mean distribution over the
    set (batch calibration) its third text becomes label 1, and a student's agreement is read against both."""
    import warnings

    from compeff.evaluate.classification import LabelledSet
    from compeff.evaluate.ruler import WordingRun, reference_preds, summarise_runs

    data = LabelledSet("s", ["a", "b", "c", "d"], [0, 0, 1, 1], ["negative", "positive"], [], [])
    inf = -np.inf
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [1.0, 1.0]])
    mass = np.log(probs)
    mass[3] = [inf, inf]  # no evidence: no label, and left out of the mean
    teacher = WordingRun("question", None, mass)
    assert teacher.preds == [0, 0, 0, -1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the text without evidence divides nothing by zero
        assert teacher.batch_calibrated_preds() == [0, 0, 1, -1]  # 0.6 / 0.767 < 0.4 / 0.233
    student = WordingRun.from_preds("question", None, [0, 1, 1, 0], 2)
    result = summarise_runs(
        data, [student], reference_preds([teacher]), reference_preds([teacher], batch_calibrated=True)
    )
    assert result["wordings"]["question"]["agreement"] == 0.25
    assert result["wordings"]["question"]["agreement_batch_calibrated"] == 0.5
    assert result["agreement_batch_calibrated"] == 0.5
    # the teacher so calibrated is scored too: three of four right (the text without evidence a miss)
    own = summarise_runs(data, [teacher])
    assert own["accuracy"] == 0.5 and own["batch_calibrated"]["accuracy"] == 0.75
    # a run known only by its labels (the bench's stored rows) has no distribution to calibrate
    labels_only = WordingRun.from_preds("question", None, teacher.preds, 2)
    assert labels_only.batch_calibrated_preds() is None
    assert "batch_calibrated" not in summarise_runs(data, [labels_only])
    with pytest.raises(ValueError, match="cannot be batch-calibrated"):
        reference_preds([labels_only], batch_calibrated=True)
