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


def test_table_has_the_kd_bytes_column_only_with_kd():
    sets = {"a": {"accuracy": 50.0, "macro_f1": 33.3, "n": 10}}
    rows = [{"row": "teacher", "samples": None, "train_s": None, "sets": sets},
            {"row": "student after KD, selected", "samples": 4, "train_s": 12.4, "sets": sets,
             "logit_bytes_per_token": 165.3, "logit_parquet_bytes_per_token": 97.1}]  # fmt: skip
    rows[0].update(logit_bytes_per_token=None, logit_parquet_bytes_per_token=None)
    table = markdown_table(rows)
    assert "| student after KD, selected | 4 | 50.0 / 33.3 | 12 | 165 / 97.1 |" in table
    assert "| teacher | - | 50.0 / 33.3 | - | - |" in table
    plain = markdown_table([{k: v for k, v in r.items() if "bytes" not in k} for r in rows])
    assert "bytes" not in plain


def test_unknown_loss_or_subset_is_one_line_and_exit_2(tmp_path):
    import subprocess

    from conftest import compeff_cmd

    with pytest.raises(ConfigError, match="unknown --loss / --subset dpo"):
        run_distill_bench(losses=("sft", "dpo"), out_dir=tmp_path)
    done = subprocess.run(compeff_cmd("bench", "distill", "--subset", "half", "--out", str(tmp_path)),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "unknown --loss / --subset half" in done.stderr
    assert "Traceback" not in done.stderr
