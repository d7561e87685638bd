"""Model loading shared by every stage (compeff.loading): dtypes kept, the reload tolerance by dtype, the
pruned student in its source's dtype."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compeff.llm_models import pruned_decoder
from compeff.loading import load_causal_lm, reload_tolerance, training_dtype


def test_pruned_student_keeps_the_source_dtype(tmp_path, tiny_lm):
    """A bf16 base is cut into a bf16 student (a 3B base would otherwise need fp32 memory and disk)."""
    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.bfloat16).save_pretrained(base)
    (base / "tokenizer.json").write_bytes((tiny_lm / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_lm / name).exists():
            (base / name).write_bytes((tiny_lm / name).read_bytes())
    folder = pruned_decoder("tiny", str(base), [1], out=tmp_path / "student")
    student = load_causal_lm(str(folder), "auto")
    assert student.dtype == torch.bfloat16 and student.config.num_hidden_layers == 1
    source = load_causal_lm(str(base), "auto")
    assert student.model.layers[0].mlp.down_proj.weight.equal(source.model.layers[1].mlp.down_proj.weight)


def test_training_dtype_and_reload_tolerance_follow_the_setting():
    assert training_dtype("on", cuda=False) == torch.bfloat16
    assert training_dtype("off", cuda=True) == torch.float32
    assert training_dtype("auto", cuda=False) == torch.float32
    assert reload_tolerance(torch.float32) == 1e-3 and reload_tolerance(
        torch.float32, scale=1e3
    ) == pytest.approx(1e-2)
    assert (
        reload_tolerance(torch.bfloat16, scale=0.1) == 1e-2
        and reload_tolerance(torch.bfloat16, scale=32.0) == 0.5
    )
    assert reload_tolerance(torch.float32, load_in_4bit=True) == reload_tolerance(torch.bfloat16)
