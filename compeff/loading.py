"""Loading causal LMs the one way every stage shares: device, dtype, 4-bit quantisation, adapters.

Scoring, evaluation, the local teacher and training all load a decoder through :func:`load_causal_lm`, so
a dtype rule (bf16 on a GPU that has it, the checkpoint's own dtype when asked for ``auto``) or a
quantisation setting lands in one place. It sits below ``select``, ``evaluate``, ``teachers`` and
``train`` and imports none of them. Names (``builtin:smollm2``, pruned students) are resolved by
:mod:`compeff.models` before a path reaches this module.
"""

from __future__ import annotations

from typing import Any

# Largest logit difference accepted between a trained model and the same model saved and loaded again,
# by the dtype both compute in: float32 reloads are exact up to kernel order; bfloat16 keeps 8 bits of
# mantissa (a relative step of 2^-8), so a merged adapter rounded into bf16 weights moves logits of a
# few units by a few hundredths; NF4 weights are dequantised blocks, their reload is exact but a merged
# adapter is requantised.
RELOAD_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1, "nf4": 2.5e-1}


def pick_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> Any:
    """'auto' -> bfloat16 on a GPU that supports it, float32 otherwise; other names are torch dtypes."""
    import torch

    if dtype == "auto":
        return (
            torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        )
    return getattr(torch, dtype)


def training_dtype(bf16: bool | str, cuda: bool) -> Any:
    """The dtype a student trains in: ``sft.bf16`` on (True), off (False) or auto (a GPU with bf16)."""
    import torch

    if bf16 == "auto":
        bf16 = cuda and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def quantization_config(load_in_4bit: bool) -> Any:
    """The QLoRA quantisation (NF4 weights, bf16 compute) or None."""
    if not load_in_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def load_causal_lm(
    path: str,
    dtype: Any,
    *,
    load_in_4bit: bool = False,
    adapter: str | None = None,
    device: str | None = None,
) -> Any:
    """A causal LM from ``path`` in ``dtype`` (a torch dtype), optionally NF4-quantised and with a PEFT
    adapter on top; moved to ``device`` when given (a quantised model stays where it was loaded)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    quantization = quantization_config(load_in_4bit)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if device is not None and quantization is None:
        model = model.to(device)
    return model


def reload_tolerance(dtype: Any, load_in_4bit: bool = False) -> float:
    """The logit drift accepted between a trained model and its saved copy, by what they compute in."""
    if load_in_4bit:
        return RELOAD_TOLERANCE["nf4"]
    return RELOAD_TOLERANCE.get(str(dtype).removeprefix("torch."), RELOAD_TOLERANCE["float32"])
