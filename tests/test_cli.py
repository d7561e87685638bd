"""The command line: every command registered, help with defaults, clear refusals."""

from __future__ import annotations

import subprocess

from conftest import compeff_cmd
from typer.testing import CliRunner

from compeff.cli import app
from compeff.stages import STAGE_NAMES

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in [
        "enumerate",
        "cluster",
        "tasks",
        "generate",
        "score",
        "sample",
        "sft",
        "eval",
        "kd",
        "bench",
        "run",
    ]:
        assert name in result.output
    assert set(STAGE_NAMES) >= {
        "enumerate",
        "cluster",
        "tasks",
        "generate",
        "score",
        "sample",
        "sft",
        "eval",
        "kd",
    }


def test_stage_help_shows_defaults_and_recipe_keys():
    result = runner.invoke(app, ["sample", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--ratio" in result.output and "Default: 0.5" in result.output and "sample.ratio" in result.output
    result = runner.invoke(app, ["enumerate", "--help"], terminal_width=200)
    assert "--min-count" in result.output and "Default: 10" in result.output


def test_bench_stage_without_encoders_says_what_to_run_first(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run: {{stages: [bench], dir: {tmp_path}}}\n")
    proc = subprocess.run(compeff_cmd("run", str(recipe)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no distilled encoders to benchmark" in proc.stderr
    assert "bench.models" in proc.stderr


def test_vllm_backend_without_vllm_is_a_clear_error(tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"id": "a", "prompt": "hi"}\n')
    proc = subprocess.run(
        compeff_cmd(
            "teach", "--input", str(requests), "--teacher-backend", "vllm", "--teacher-model", "some/model"
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "pip install 'compeff[vllm]'" in proc.stderr


def test_teach_input_errors_name_the_line(tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b"}\n')
    proc = subprocess.run(
        compeff_cmd("teach", "--input", str(requests)), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert f"{requests}:2" in proc.stderr and "messages" in proc.stderr


def test_list_flags_of_annotated_fields_exist():
    result = runner.invoke(app, ["enumerate", "--help"], terminal_width=200)
    assert "--user-texts" in result.output and "data.user_texts" in result.output
