"""compeff bench cut and compeff.layer_cut: angular distances between depths, the block cut they choose,
and the bench that trains each cut on true labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compeff.bench.cut import cut_label, cut_overrides, gold_chat_rows, parse_cut, run_cut_bench
from compeff.cli import app
from compeff.config import ConfigError
from compeff.layer_cut import angular_distances, closest_block_cut, cut_distance, dropped_blocks


def test_angular_distance_matches_a_hand_computation_and_ignores_left_padding(tmp_path, tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    with torch.no_grad():  # a final norm that turns the stream, as trained models' do
        model.model.norm.weight.copy_(torch.linspace(0.1, 3.0, model.model.norm.weight.numel()))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    path = str(tmp_path / "m")
    short, long = "a fine film", "a long and slow film that never ends, with a dull cast and a worse plot"
    together = angular_distances(path, [short, long], batch_size=2)
    alone = (angular_distances(path, [short]) + angular_distances(path, [long])) / 2
    assert together.shape == (3, 3) and np.allclose(together, alone, atol=1e-5)  # padding moves nothing
    assert np.all(np.diag(together) == 0) and np.allclose(np.tril(together, -1), 0)
    out = []
    model.model.layers[-1].register_forward_hook(
        lambda m, i, o: out.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        states = model(**tok(long, return_tensors="pt"), output_hidden_states=True).hidden_states

    def by_hand(a, b):
        return math.acos(float(torch.nn.functional.cosine_similarity(a[0, -1], b[0, -1], dim=0))) / math.pi

    d = angular_distances(path, [long])
    assert d[0, 1] == pytest.approx(by_hand(states[0], states[1]), abs=1e-5)
    # the deepest depth is the last layer's output, not transformers' final (normed) hidden state
    assert d[0, 2] == pytest.approx(by_hand(states[0], out[0]), abs=1e-5)
    assert abs(by_hand(states[0], states[2]) - by_hand(states[0], out[0])) > 1e-3


def test_the_closest_block_cut_drops_the_block_whose_ends_are_nearest():
    d = np.full((7, 7), 0.5)  # 6 layers
    d[2, 5], d[0, 3], d[3, 6] = 0.1, 0.2, 0.1  # two blocks of 3 tie at 0.1: the first wins
    assert closest_block_cut(d, 3) == [0, 1, 5]
    assert closest_block_cut(d, 6) == list(range(6))  # nothing dropped
    with pytest.raises(ValueError):
        closest_block_cut(d, 0)
    assert dropped_blocks([0, 1, 5], 6) == [(2, 5)]
    assert dropped_blocks([1, 3], 6) == [(0, 1), (2, 3), (4, 6)]
    d[0, 1], d[2, 3], d[4, 6] = 0.05, 0.07, 0.3
    assert cut_distance(d, [1, 3]) == pytest.approx(0.42) and cut_distance(d, list(range(6))) == 0.0


def test_cut_specs_parse_and_print_back_and_bad_ones_are_one_error():
    assert parse_cut("0-7,28-29", 30) == [0, 1, 2, 3, 4, 5, 6, 7, 28, 29]
    assert cut_label(parse_cut("9, 0,3,6", 30)) == "0,3,6,9"
    assert cut_label([0, 1, 2, 5, 6, 9]) == "0-2,5-6,9"
    for bad in ("0-30", "a-b", "", "1,1", "3-1"):
        with pytest.raises(ConfigError):
            parse_cut(bad, 30)


def test_the_ceiling_set_asks_true_labels_in_the_seed_polarity_wordings():
    from compeff.evaluate.eval_stage import load_eval_set
    from compeff.synth.seed_tasks import SEED_TASKS

    rows = gold_chat_rows(6, 120, 42, None)
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    reviews = load_eval_set("imdb:train", 6, 42, None)
    for row, text, label in zip(rows[:6], reviews.texts, reviews.labels, strict=True):
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert answer == reviews.label_names[label] and text[:120] in user
        assert len(text) <= 120 or text[:121] not in user  # cut to max_chars
    wordings = {w.split("{text}")[0].replace("{labels_or}", "negative, neutral or positive")
                for w in SEED_TASKS["polarity3"]["wordings"]}  # fmt: skip
    assert all(any(r["messages"][0]["content"].startswith(w) for w in wordings) for r in rows[6:])
    assert {r["messages"][1]["content"] for r in rows[6:]} <= {"negative", "neutral", "positive"}


def test_bench_cut_trains_each_cut_on_true_labels_and_reuses_it(tmp_path, tiny_lm):
    sets = [f"student.model={tiny_lm}", f"teacher.model={tiny_lm}", "student.keep_layers=[0]",
            "sft.max_steps=2", "sft.per_device_batch_size=2", "eval.max_length=128", "generate.max_chars=80"]  # fmt: skip
    sets.append("data.user_texts=[imdb:unsupervised]")
    args = dict(recipe_path=None, cuts=("recipe", "closest", "0-1"), train_texts=3, tweeteval=6, imdb=4, out_dir=tmp_path,
                overrides=sets)  # fmt: skip
    rows = run_cut_bench(**args)
    root = tmp_path / "cut-bench"
    kept = json.loads((root / "cut_bench.json").read_text())
    distances = np.array(kept["distances"])
    closest = closest_block_cut(distances, 1)
    cuts = [[0]] + ([closest] if closest != [0] else []) + [[0, 1]]
    assert [r["row"].split(" (")[0] for r in rows[1::2]] == [f"{len(c)} layers {cut_label(c)}" for c in cuts]
    assert rows[0]["row"] == "teacher" and len(rows) == 1 + 2 * len(cuts)
    assert [r["distance"] for r in rows[1::2]] == [cut_distance(distances, c) for c in cuts]
    assert rows[-1]["distance"] == 0.0 and rows[-1]["sets"]["imdb:test"]["n"] == 4
    gold = [json.loads(line) for line in (root / "sets" / "gold-cut.jsonl").read_text().splitlines()]
    assert len(gold) == 6 and all(r["samples"] == 6 for r in rows[2::2])
    for c in cuts:
        assert (root / f"sft-cut-{cut_label(c).replace(',', '_')}" / "model" / "config.json").is_file()
    assert "| teacher | - |" in (root / "cut_bench.md").read_text()
    kept_files = [root / "sft-cut-0" / "manifest.json", root / "eval" / "sft-cut-0.json",
                  root / "eval" / "before-0.json", root / "eval" / "teacher.json"]  # fmt: skip
    made = [f.stat().st_mtime_ns for f in kept_files]
    run_cut_bench(**args)  # a second run reuses the trained cuts and their scores
    assert [f.stat().st_mtime_ns for f in kept_files] == made


def test_a_bad_cut_is_one_line_and_exit_2(tmp_path, tiny_lm):
    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    result = CliRunner().invoke(app, ["bench", "cut", "--recipe", str(recipe), "--cut", "0-5", "--out", str(tmp_path),
                                      "--set", f"student.model={tiny_lm}"])  # fmt: skip
    assert result.exit_code == 2 and "need distinct layers of 0..1" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "cut-bench" / "eval").exists()
    result = CliRunner().invoke(app, ["bench", "cut", "--recipe", str(recipe), "--cut", "closest", "--out",
                                      str(tmp_path), "--set", f"student.model={tiny_lm}"])  # fmt: skip
    assert result.exit_code == 2 and "keeps 10 layers" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        app, ["bench", "cut", "--recipe", str(recipe), "--imdb", "0", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "--imdb must be at least 1" in result.output


def test_cut_layers_keeps_the_block_cut_that_moves_the_stream_least_measured_once(tmp_path, compeff_home):
    """``student.cut_layers: n`` builds the student ``closest_block_cut`` picks from the angular
    distances on the run's user texts; the distances are kept in $COMPEFF_HOME and read back, and a
    cut larger than the model or both ways of cutting at once are one line and exit 2."""
    from compeff import models
    from compeff.config import load_recipe
    from compeff.data import DataError, select_user_texts
    from compeff.models import build_tiny_chat_model, student_model

    deep = build_tiny_chat_model(tmp_path / "deep", layers=6, seed=3)
    sets = [f"student.model={deep}", "student.cut_layers=3", "data.user_texts=[imdb:unsupervised]"]
    recipe = load_recipe(None, sets)
    rows, _ = select_user_texts(["imdb:unsupervised"], models.CUT_TEXTS, models.CUT_SEED)
    distances = angular_distances(str(deep), [r["text"][: models.CUT_CHARS] for r in rows])
    expected = closest_block_cut(distances, 3)
    cut = Path(student_model(recipe.student, recipe.data))
    assert json.loads((cut / "compeff_pruned.json").read_text())["keep_layers"] == expected
    kept = list((compeff_home / "pruned").glob(f"distances-{deep.name}-*.json"))
    assert len(kept) == 1 and np.allclose(json.loads(kept[0].read_text())["distances"], distances)
    made = kept[0].stat().st_mtime_ns
    models._DISTANCES.clear()  # a new process reads the kept distances and builds the same cut
    assert Path(student_model(recipe.student, recipe.data)) == cut and kept[0].stat().st_mtime_ns == made
    fixed = load_recipe(None, [f"student.model={deep}", f"student.keep_layers={expected}"])
    assert Path(student_model(fixed.student, fixed.data)) == cut  # the same cut as listing its layers
    too_many = load_recipe(None, [*sets[:1], "student.cut_layers=7", *sets[2:]])
    with pytest.raises(DataError, match="student.cut_layers 7: .* has 6 layers"):
        student_model(too_many.student, too_many.data)
    with pytest.raises(ConfigError, match="keep_layers .* or cut_layers .*, not both"):
        load_recipe(None, [*sets, "student.keep_layers=[0, 1]"])
    trained = load_recipe(None, cut_overrides(sets, tmp_path / "gold.jsonl", expected))  # bench cut's rows
    assert trained.student.keep_layers == expected and trained.student.cut_layers is None
    quickstart = str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")
    result = CliRunner().invoke(app, ["bench", "cut", "--recipe", quickstart, "--cut", "recipe", "--out", str(tmp_path),
                                      "--set", f"student.model={deep}", "--set", "student.keep_layers=null",
                                      "--set", "student.cut_layers=9"])  # fmt: skip
    assert result.exit_code == 2 and "keeps 9 layers" in result.output and "Traceback" not in result.output


def test_an_unset_cut_layers_leaves_the_sft_fingerprint_of_older_run_folders_alone():
    """SFT stages are fingerprinted by the student settings: ``cut_layers`` (added later) counts only
    when set, so a run folder trained before it existed resumes instead of conflicting."""
    from compeff.config import load_recipe
    from compeff.train.sft import student_config

    listed = load_recipe(None, ["student.keep_layers=[0, 1]"]).student
    assert "cut_layers" not in student_config(listed)
    assert student_config(listed) == {k: v for k, v in listed.model_dump(exclude={"heal": {"device"}}).items()
                                      if k != "cut_layers"}  # fmt: skip
    chosen = load_recipe(None, ["student.cut_layers=2"]).student
    assert student_config(chosen)["cut_layers"] == 2


def test_cutting_an_encoder_is_one_line_before_any_weights_load(tmp_path, compeff_home):
    """keep_layers and cut_layers cut decoder-only causal LMs: an encoder named as the student is refused
    with one line naming what it is, from its config alone (no weights, no measurement)."""
    from transformers import BertConfig

    from compeff.config import load_recipe
    from compeff.data import DataError
    from compeff.models import student_model

    encoder = tmp_path / "encoder"
    config = BertConfig(hidden_size=8, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16)
    config.architectures = ["BertForMaskedLM"]
    config.save_pretrained(encoder)  # a config only: a check that loaded weights would fail otherwise
    built = sorted((compeff_home / "pruned").glob("*"))
    for way in ("student.cut_layers=2", "student.keep_layers=[0, 3]"):
        recipe = load_recipe(None, [f"student.model={encoder}", way, "data.user_texts=[imdb:unsupervised]"])
        with pytest.raises(DataError, match=r"model\.model\.layers .*; .* is BertForMaskedLM"):
            student_model(recipe.student, recipe.data)
    assert sorted((compeff_home / "pruned").glob("*")) == built  # nothing measured, nothing built
    # a decoder is known by its layout, not by a name: a config saved without "architectures" is cut
    from transformers import LlamaConfig

    from compeff.llm_models import decoder_depth

    bare = tmp_path / "bare"
    LlamaConfig(
        hidden_size=8, num_hidden_layers=5, num_attention_heads=2, intermediate_size=16
    ).save_pretrained(bare)
    assert decoder_depth("bare", str(bare)) == 5
