"""student.heal: a cut student brought back toward the model it was cut from by KL on user texts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import compeff_cmd

from compeff.config import ConfigError, load_recipe
from compeff.models import build_tiny_chat_model, default_corpus, student_model


@pytest.fixture(scope="module")
def tiny_four_layers(tmp_path_factory) -> Path:
    """A 4-layer random Llama (the model a student is cut from)."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-4l"), layers=4, seed=3)


def _texts_file(folder: Path, n: int, seed: int) -> Path:
    path = folder / "texts.jsonl"
    rows = [{"id": str(i), "text": t} for i, t in enumerate(default_corpus(n, seed=seed))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _mean_kl(base: str, student: str, texts: list[str]) -> float:
    """KL(base || student) per token on ``texts``, computed here from the two folders."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "right"
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    cut = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    enc = tok(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"][:, 1:].bool()
    with torch.no_grad():
        p = F.log_softmax(full(**enc).logits[:, :-1][mask], -1)
        q = F.log_softmax(cut(**enc).logits[:, :-1][mask], -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_healing_brings_the_cut_closer_to_its_base_on_unseen_texts(tiny_four_layers, tmp_path):
    texts = _texts_file(tmp_path, 400, seed=5)
    settings = [
        f"student.model={tiny_four_layers}",
        "student.keep_layers=[0, 3]",
        f"data.user_texts=[{texts}]",
        "student.heal.steps=40",
        "student.heal.learning_rate=3e-3",
        "student.heal.batch_size=16",
        "student.heal.n_texts=300",
    ]
    recipe = load_recipe(None, settings)
    cut = student_model(recipe.student, recipe.data, healed=False)
    healed = student_model(recipe.student, recipe.data, progress=False)
    assert healed != cut and Path(healed).parent == Path(cut).parent
    card = json.loads((Path(healed) / "compeff_healed.json").read_text())
    assert card["texts"] == {"train": 270, "held_out": 30}
    assert card["held_out_kl_after"] < card["held_out_kl_before"]

    unseen = default_corpus(40, seed=99)  # other sentences than any healing text
    before, after = (
        _mean_kl(str(tiny_four_layers), cut, unseen),
        _mean_kl(str(tiny_four_layers), healed, unseen),
    )
    assert after < 0.8 * before, (before, after)
    assert json.loads((Path(healed) / "config.json").read_text())["num_hidden_layers"] == 2

    # built once: the same folder again, not written again; other settings, another folder
    stamp = (Path(healed) / "model.safetensors").stat().st_mtime_ns
    assert student_model(recipe.student, recipe.data, progress=False) == healed
    assert (Path(healed) / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(Path(healed).parent.glob(f".{Path(healed).name}-*"))  # no build folder left behind
    tok = json.loads((Path(healed) / "tokenizer_config.json").read_text())
    assert tok == json.loads((Path(cut) / "tokenizer_config.json").read_text())  # the cut's own files
    other = load_recipe(None, [*settings, "student.heal.steps=5"])
    assert student_model(other.student, other.data, progress=False) not in (healed, cut)


def test_healing_without_a_cut_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        compeff_cmd("score", "--set", "student.heal.steps=10", "--set", "student.keep_layers=null"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "student.heal.steps > 0 heals a cut student" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_an_empty_list_of_healing_sources_is_a_config_error_not_a_fallback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student: {keep_layers: [0, 1], heal: {steps: 5, texts: []}}\n")
    with pytest.raises(ConfigError, match="student.heal.texts"):
        load_recipe(recipe)
    assert load_recipe(recipe, ["student.heal.texts=null"]).student.heal.texts is None


def test_two_builders_of_one_healed_student_build_it_once(tiny_four_layers, tmp_path, monkeypatch):
    """Two ranks (here threads) asking for the same healed student: one heals, the other waits on the
    lock and reads the finished copy."""
    import threading

    import compeff.healing as healing

    texts = _texts_file(tmp_path, 60, seed=8)
    recipe = load_recipe(
        None,
        [f"student.model={tiny_four_layers}", "student.keep_layers=[1, 2]", f"data.user_texts=[{texts}]",
         "student.heal.steps=6", "student.heal.n_texts=50"],
    )  # fmt: skip
    cut = student_model(recipe.student, recipe.data, healed=False)
    builds, real_heal = [], healing._heal
    monkeypatch.setattr(healing, "_heal", lambda *a, **k: builds.append(1) or real_heal(*a, **k))
    got: list[Path] = []
    threads = [
        threading.Thread(target=lambda: got.append(healing.heal_decoder(
            str(tiny_four_layers), Path(cut), [f"text {i} of the run" for i in range(30)],
            recipe.student.heal, progress=False)))
        for _ in range(2)
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(got) == 2 and got[0] == got[1] and (got[0] / "config.json").is_file()
    assert builds == [1]


def test_healing_on_fewer_than_two_texts_is_a_data_error(tiny_four_layers, tmp_path):
    from compeff.data import DataError
    from compeff.healing import heal_decoder

    cut = build_tiny_chat_model(tmp_path / "cut", layers=2, seed=4)
    heal = load_recipe(None, ["student.heal.steps=3", "student.keep_layers=[0]"]).student.heal
    with pytest.raises(DataError, match="at least 2"):
        heal_decoder(str(tiny_four_layers), cut, ["only one text"], heal, progress=False)
