"""Encoder distillation: losses against hand-computed values, pruned students, metrics, the teacher
logit cache, baselines, and a short real distillation of the shipped MiniLM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from compeff.models import minilm_path
from compeff.train.baselines import baseline_logits
from compeff.train.encoder_kd import (
    Encoded,
    TeacherLogitCache,
    classifier_metrics,
    encode,
    expected_calibration_error,
    layer_pruned_copy,
    length_grouped_batches,
    predict_logits,
    train_classifier,
)
from compeff.train.kd_losses import HiddenStateLoss, corrected_targets, kd_loss, soft_targets


def test_kd_loss_by_hand():
    z_s = torch.tensor([[1.0, 0.0]])
    z_t = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([0])
    T, alpha = 2.0, 0.3
    p_t = [1 / (1 + math.e), math.e / (1 + math.e)]  # softmax([0, 1])
    p_s = [math.e**0.5 / (1 + math.e**0.5), 1 / (1 + math.e**0.5)]  # softmax([0.5, 0])
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    ce = -math.log(math.e / (1 + math.e))
    expected = alpha * T**2 * kl + (1 - alpha) * ce
    got = kd_loss(z_s, soft_targets(z_t, T), y, T, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(z_s, soft_targets(z_t, T), y, T, 0.0).item() == pytest.approx(ce, rel=1e-6)


def test_corrected_targets_replace_only_wrong_rows():
    z_t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, 2])  # the teacher is right on row 0, wrong on row 1
    targets = corrected_targets(z_t, y, temperature=2.0)
    assert torch.allclose(targets[0], soft_targets(z_t[:1], 2.0)[0])
    assert targets[1].tolist() == [0.0, 0.0, 1.0]


def test_hidden_state_loss_projects_and_maps_layers():
    loss = HiddenStateLoss(student_width=4, teacher_width=6, layer_map=[(0, 1), (1, 3)])
    student = [torch.randn(2, 5, 4) for _ in range(2)]
    teacher = [torch.randn(2, 5, 6) for _ in range(4)]
    mask = torch.ones(2, 5, dtype=torch.long)
    value = loss(student, teacher, mask)
    assert value.ndim == 0 and value.item() > 0
    assert loss.projection.weight.shape == (6, 4)
    value.backward()
    assert loss.projection.weight.grad is not None
    same = HiddenStateLoss(4, 4, [(0, 0)])
    assert same(student[:1], student[:1]).item() == 0.0


def test_ece_and_metrics_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 1, 1])
    # bins of width 0.5: (0.5, 1.0] holds all three; confidence mean 0.7667, accuracy 2/3
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(abs(0.76667 - 2 / 3), abs=1e-4)
    m = classifier_metrics(np.log(probs), labels, teacher_logits=np.log(probs))
    assert m["accuracy"] == pytest.approx(2 / 3) and m["agreement"] == 1.0
    assert m["confidence"] == pytest.approx(0.76667, abs=1e-4)


@pytest.fixture(scope="module")
def minilm_classifier():
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return tok, model


def test_layer_pruned_copy_keeps_the_chosen_layers(minilm_classifier):
    _, teacher = minilm_classifier
    student = layer_pruned_copy(teacher, [0, 5])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert len(teacher.bert.encoder.layer) == 6  # the teacher is left whole
    for s_i, t_i in ((0, 0), (1, 5)):
        s_w = student.bert.encoder.layer[s_i].attention.self.query.weight
        assert torch.equal(s_w, teacher.bert.encoder.layer[t_i].attention.self.query.weight)
        assert s_w.data_ptr() != teacher.bert.encoder.layer[t_i].attention.self.query.weight.data_ptr()
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    with pytest.raises(ValueError, match="indices"):
        layer_pruned_copy(teacher, [7])


def test_head_tail_truncation_keeps_both_ends(minilm_classifier):
    tok, _ = minilm_classifier
    text = "start " + " ".join(f"w{i}" for i in range(300)) + " finale"
    plain = encode(tok, [text], [0], 32, "plain")
    both = encode(tok, [text], [0], 32, "head_tail")
    decoded = tok.decode(both.input_ids[0][both.attention_mask[0] == 1])
    assert "start" in decoded and "finale" in decoded
    assert "finale" not in tok.decode(plain.input_ids[0])
    assert int(both.attention_mask.sum()) == 32


def test_length_sorted_prediction_keeps_the_row_order(minilm_classifier):
    tok, model = minilm_classifier
    rng = np.random.default_rng(0)
    texts = [" ".join(["word"] * int(rng.integers(1, 60))) + f" row{i}" for i in range(21)]
    data = encode(tok, texts, [0] * len(texts), 48, "head_tail")
    batched = predict_logits(model, data, batch_size=4)
    one_by_one = np.concatenate(
        [
            predict_logits(
                model,
                Encoded(data.input_ids[i : i + 1], data.attention_mask[i : i + 1], data.labels[i : i + 1]),
            )
            for i in range(len(texts))
        ]
    )
    assert batched.shape == (21, 2)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_length_grouped_batches_cover_each_text_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = torch.from_numpy(rng.integers(5, 64, size=1000))
    batches = list(length_grouped_batches(lengths, 32, np.random.default_rng(1)))
    seen = torch.cat(batches).tolist()
    assert sorted(seen) == list(range(1000))  # every text once per epoch
    assert [len(b) for b in batches].count(32) == 31 and lengths[batches[0]].max() == lengths.max()
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    randomly = sum(int(lengths[b].max()) * len(b) for b in torch.randperm(1000).split(32))
    assert padded < 0.75 * randomly  # random batches pad each text to its batch's longest
    again = list(length_grouped_batches(lengths, 32, np.random.default_rng(1)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))  # seeded


def test_cached_teacher_logits_are_reused(tmp_path, minilm_classifier):
    tok, model = minilm_classifier
    model.save_pretrained(tmp_path / "teacher")
    data = encode(tok, ["good film", "bad film", "fine"], [1, 0, 1], 16)
    cache = TeacherLogitCache(tmp_path / "cache")
    first = cache.get(tmp_path / "teacher", "toy", 16, "plain", lambda: predict_logits(model, data))
    again = cache.get(tmp_path / "teacher", "toy", 16, "plain", lambda: pytest.fail("the teacher ran twice"))
    assert cache.computed == 1 and np.array_equal(first, again)
    other = cache.get(tmp_path / "teacher", "toy", 24, "plain", lambda: predict_logits(model, data))
    assert cache.computed == 2 and other.shape == first.shape  # another max_length is another entry


def test_distilled_student_improves_on_its_start(minilm_classifier):
    """A real teacher (MiniLM fine-tuned on a marker-word task) and a 2-layer copy distilled from it."""
    tok, base = minilm_classifier
    rng = np.random.default_rng(0)
    words = ["film", "plot", "actor", "scene", "music", "story", "camera", "ending"]

    def texts(n):
        out, labels = [], []
        for i in range(n):
            label = i % 2
            w = list(rng.choice(words, 6))
            w.insert(3, "superb" if label else "awful")
            out.append(" ".join(w))
            labels.append(label)
        return out, labels

    train_t, train_y = texts(96)
    test_t, test_y = texts(64)
    train = encode(tok, train_t, train_y, 16)
    test = encode(tok, test_t, test_y, 16)
    teacher = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    train_classifier(teacher, train, epochs=2, lr=1e-4, batch_size=16, seed=0)
    t_train = predict_logits(teacher, train)
    assert classifier_metrics(predict_logits(teacher, test), np.array(test_y))["accuracy"] >= 0.9
    student = layer_pruned_copy(teacher, [0, 5])
    for layer in student.bert.encoder.layer:  # scramble the copied layers: an untrained start
        for p in layer.parameters():
            if p.dim() == 2:  # weight matrices; layer norms stay as they are
                torch.nn.init.normal_(p, std=0.02)
    before = classifier_metrics(predict_logits(student, test), np.array(test_y))["accuracy"]
    train_classifier(
        student, train, epochs=4, lr=3e-4, batch_size=16, seed=0, teacher_logits=t_train, loss="kd"
    )
    after = classifier_metrics(predict_logits(student, test), np.array(test_y))["accuracy"]
    assert after >= 0.9 > before + 0.1 or after >= before + 0.2


def test_tfidf_baselines_learn_a_readable_task():
    train = ["good great fine", "bad awful poor"] * 20
    labels = [1, 0] * 20
    for kind in ("nb", "lr"):
        logits = baseline_logits(kind, train, labels, ["great good", "awful bad"])
        assert logits.argmax(1).tolist() == [1, 0]


def test_black_box_soft_labels_from_a_local_llm(tiny_lm):
    from compeff.evaluate.classification import EvalError, HFLabelScorer
    from compeff.train.blackbox import check_single_tokens, local_llm_soft_labels, normalise

    scorer = HFLabelScorer(str(tiny_lm))
    labels = ["awful", "great"]
    check_single_tokens(scorer.tokenizer, labels)  # both are single tokens with a leading space
    probs = local_llm_soft_labels(scorer, ["the film was fun", "slow plot", "sad music"], labels)
    assert probs.shape == (3, 2) and np.all(probs >= 0) and np.allclose(probs.sum(1), 1.0)
    with pytest.raises(EvalError, match="tokens in the teacher's tokenizer"):
        check_single_tokens(scorer.tokenizer, ["awful", "xqzjwv"])
    served = normalise(np.array([[-0.1, -2.0, -np.inf], [-np.inf, -np.inf, -np.inf]]))
    assert np.allclose(served.sum(1), 1.0) and served[0, 2] == 0.0 and np.allclose(served[1], 1 / 3)


def test_kd_stage_end_to_end_and_teacher_reuse(tmp_path):
    import json

    from compeff.config import load_recipe
    from compeff.runs import iter_jsonl
    from compeff.train.kd_stage import run_kd_stage

    other = tmp_path / "other-encoder"  # a student from a path of its own: encoded with its own tokenizer
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(other)
    AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3).save_pretrained(other)
    overrides = [
        f"run.dir={tmp_path}",
        "run.name=kd",
        "kd.train_limit=48",
        "kd.test_limit=60",
        "kd.max_length=48",
        "kd.teacher_epochs=1",
        "kd.student_epochs=1",
        "kd.batch_size=16",
        f"kd.students=[{{name: two, init_from_teacher: true, layers: [0, 5]}}, {{name: own, model: {other}}}]",
        "kd.losses=[ce, kd]",
        "kd.seeds=[1]",
    ]
    manifest = run_kd_stage(load_recipe(None, overrides), progress=False)
    assert manifest["teacher_runs"] == 2  # train and test logits, computed once
    rows = {r["id"]: r for r in iter_jsonl(tmp_path / "kd" / "kd" / "data.jsonl")}
    assert set(rows) == {
        "teacher|-|-",
        "tfidf-nb|-|-",
        "tfidf-lr|-|-",
        "two|ce|1",
        "two|kd|1",
        "own|ce|1",
        "own|kd|1",
    }
    for key in ("two|ce|1", "two|kd|1"):
        assert 0 <= rows[key]["accuracy"] <= 1 and 0 <= rows[key]["agreement"] <= 1 and rows[key]["ece"] >= 0
    results = json.loads((tmp_path / "kd" / "kd" / "results.json").read_text())
    assert {r["row"] for r in results["rows"]} >= {"two (kd)", "teacher (ce)", "tfidf-lr"}
    assert "of teacher" in (tmp_path / "kd" / "kd" / "results.md").read_text()
    overrides[8] = "kd.students=[{name: two, init_from_teacher: true, layers: [0, 5]}]"
    search = ["kd.search=true", "kd.search_temperatures=[1.0, 4.0]", "kd.search_alphas=[0.5]", "kd.search_lrs=[1e-4]",
              "kd.losses=[kd]"]  # fmt: skip
    again = run_kd_stage(load_recipe(None, overrides + search), force=True, progress=False)
    assert again["teacher_runs"] == 0 and "teacher_train_s" not in again  # students only, teacher reused
    assert again["search_best"]["temperature"] in (1.0, 4.0)
    searched = [r for r in iter_jsonl(tmp_path / "kd" / "kd" / "data.jsonl") if r["model"] == "search"]
    assert [r["round"] for r in searched] == [0, 0, 1]


def test_successive_halving_keeps_the_best_and_resumes():
    from compeff.train.search import config_id, grid, successive_halving

    configs = grid([1.0, 2.0, 4.0], [0.5, 0.9], [1e-4])
    calls = []

    def evaluate(config, share):  # the best is T=2, alpha=0.9; more data scores a little higher
        calls.append((config_id(config), share))
        return -abs(config["temperature"] - 2.0) + config["alpha"] + 0.01 * share

    best, history = successive_halving(configs, evaluate, fraction=0.25)
    assert best == {"temperature": 2.0, "alpha": 0.9, "lr": 1e-4}
    assert [len(h["scores"]) for h in history] == [6, 3, 1]
    assert [h["share"] for h in history] == [0.25, 0.5, 1.0]
    first_round = {(0, config_id(c)): s for c, s in history[0]["scores"]}
    calls.clear()
    best_again, _ = successive_halving(configs, evaluate, fraction=0.25, done=first_round)
    assert best_again == best and all(share > 0.25 for _, share in calls)  # round 0 was not redone


def test_hidden_loss_adds_the_mapped_hidden_state_term(minilm_classifier):
    from compeff.train.encoder_kd import HiddenMatch

    tok, teacher = minilm_classifier
    data = encode(tok, ["good film", "bad plot", "fine music", "awful ending"], [1, 0, 1, 0], 16)
    t_logits = predict_logits(teacher, data)
    first = {}
    for loss in ("kd", "hidden"):
        student = layer_pruned_copy(teacher, [0, 5])
        match = (
            HiddenMatch(teacher, HiddenStateLoss(384, 384, [(0, 0), (1, 1), (2, 6)]))
            if loss == "hidden"
            else None
        )
        values = train_classifier(student, data, epochs=1, lr=1e-5, batch_size=4, seed=3, teacher_logits=t_logits,
                                  loss=loss, hidden=match)  # fmt: skip
        first[loss] = values[0]
    assert first["hidden"] > first["kd"] > 0  # same batch, same start: the MSE term is on top
    with pytest.raises(ValueError, match="needs the teacher"):
        train_classifier(
            layer_pruned_copy(teacher, [0]), data, 1, 1e-5, 4, 0, teacher_logits=t_logits, loss="hidden"
        )
