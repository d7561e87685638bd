"""Recipes: schema, YAML, --set overrides, and errors that name the key and exit with code 2."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from conftest import REPO, compeff_cmd

from compeff.config import ConfigError, Recipe, load_recipe


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(compeff_cmd(*args), capture_output=True, text=True, timeout=120)


def test_shipped_recipes_validate():
    paper = load_recipe(REPO / "recipes" / "paper.yaml")
    assert paper.teacher.backend == "openai"
    assert paper.teacher.model == "meta-llama/Llama-3.1-70B-Instruct"
    assert paper.embedder.model == "WhereIsAI/UAE-Large-V1" and paper.embedder.pooling == "cls"
    assert paper.student.model == "meta-llama/Llama-3.2-3B-Instruct"
    assert (paper.enumerate.n_texts, paper.enumerate.min_count) == (20000, 10)
    assert paper.cluster.damping == 0.9 and paper.tasks.demo_calls == 16 and paper.sample.ratio == 0.5
    assert (paper.sft.learning_rate, paper.sft.lr_scheduler, paper.sft.epochs) == (5e-5, "cosine", 4)
    assert (paper.sft.max_length, paper.sft.weight_decay) == (2048, 0.1)
    quick = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert quick.teacher.backend == "hf" and quick.teacher.model == "builtin:smollm2"
    assert quick.student.model == "builtin:smollm2" and len(quick.student.keep_layers) == 10


def test_set_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"sample": {"ratio": 0.3}, "teacher": {"backend": "openai"}}))
    recipe = load_recipe(
        path,
        [
            "sample.ratio=0.25",
            "teacher.base_urls=[http://127.0.0.1:1/v1, http://127.0.0.1:2/v1]",
            "teacher.cache=null",
        ],
    )
    assert recipe.sample.ratio == 0.25
    assert recipe.teacher.base_urls == ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]
    assert recipe.teacher.cache is None
    assert recipe.teacher.backend == "openai"  # untouched keys keep the file's value


def test_empty_recipe_is_valid_offline_default():
    recipe = Recipe()
    assert recipe.teacher.backend == "hf" and recipe.embedder.model == "builtin:minilm"


@pytest.mark.parametrize(
    ("content", "overrides", "key"),
    [
        ({"teacher": {"concurency": 4}}, [], "teacher.concurency: unknown key"),
        ({"sample": {"ratio": "half"}}, [], "sample.ratio:"),
        ({"data": {"user_texts": ["./missing.jsonl"]}}, [], "data.user_texts.0: file or folder not found"),
        ({}, ["cluster.damping=abc"], "cluster.damping:"),
        ({"run": {"stages": ["enumerate", "distil"]}}, [], "run.stages.1: unknown stage 'distil'"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, content, overrides, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as err:
        load_recipe(path, overrides)
    assert key in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("teacher:\n  bogus: 1\n", "teacher.bogus: unknown key"),
        ("teacher:\n  concurrency: many\n", "teacher.concurrency:"),
        ("data:\n  user_texts: [./nowhere/texts.jsonl]\n", "data.user_texts.0: file or folder not found"),
    ],
)
def test_cli_config_errors_one_line_exit_2(tmp_path, content, key):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    proc = run_cli("enumerate", "--config", str(path))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert key in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_missing_recipe_file_and_bad_yaml(tmp_path):
    proc = run_cli("teach", "--config", str(tmp_path / "none.yaml"))
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr
    bad = tmp_path / "broken.yaml"
    bad.write_text("teacher: [unclosed\n")
    proc = run_cli("teach", "--config", str(bad))
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr and "line" in proc.stderr


def test_cli_set_error_exit_2():
    proc = run_cli("sample", "--set", "sample.ratio=2.5")
    assert proc.returncode == 2
    assert "sample.ratio" in proc.stderr


def test_switches_accept_yaml_booleans_and_words():
    """`--set sft.bf16=on` reaches the recipe as YAML's True; words and booleans mean the same."""
    assert load_recipe(None, ["sft.bf16=on"]).sft.bf16 == "on"
    assert load_recipe(None, ["sft.bf16=false"]).sft.bf16 == "off"
    assert load_recipe(None, ['sft.bf16="on"']).sft.bf16 == "on"
    from compeff.cli import settings_options
    from compeff.config import SftSettings

    flags = {name for name, _ in settings_options("sft", SftSettings)}
    assert "sft__bf16" in flags  # `compeff sft --bf16 on` stays a flag
    assert load_recipe(None, []).sft.bf16 == "auto"
    with pytest.raises(ConfigError, match="sft.bf16"):
        load_recipe(None, ["sft.bf16=sometimes"])
