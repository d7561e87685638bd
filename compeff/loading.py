"""Loading causal LMs the one way every stage shares: device, dtype, 4-bit quantisation, adapters.

Scoring, evaluation, the local teacher and training all load a decoder through :func:`load_causal_lm`, so
a dtype rule (bf16 on a GPU that has it, the checkpoint's own dtype when asked for ``auto``) or a
quantisation setting lands in one place. It sits below ``select``, ``evaluate``, ``teachers`` and
``train`` and imports none of them. Names (``builtin:smollm2``, pruned students) are resolved by
:mod:`compeff.models` before a path reaches this module.
"""

from __future__ import annotations

from typing import Any

# Largest logit difference accepted between a trained model and the same model saved and loaded again in
# the same dtype and quantisation: (absolute floor, share of the largest logit). Both sides compute alike,
# so only the kernels' summation order can differ: within a few units in the last place of the dtype
# (bf16 keeps 8 bits of mantissa: 2^-8 relative; NF4 computes in bf16), and nothing near what a missing or
# wrong adapter moves.
RELOAD_TOLERANCE = {
    "float32": (1e-3, 1e-5),
    "float16": (1e-2, 2**-8),
    "bfloat16": (1e-2, 2**-6),
    "nf4": (1e-2, 2**-6),
}


def pick_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def local_device(device: str = "auto") -> str:
    """Where one process's own work runs: ``auto`` is this rank's GPU under torchrun/accelerate
    (LOCAL_RANK), a GPU when one is visible, else the CPU; anything else as given."""
    import os

    import torch

    if device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # a launcher that gives each rank one GPU (CUDA_VISIBLE_DEVICES) shows it as cuda:0
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return pick_device(device)


def pick_dtype(dtype: str, device: str) -> Any:
    """'auto' -> bfloat16 on a GPU that supports it, float32 otherwise; other names are torch dtypes."""
    import torch

    if dtype == "auto":
        return (
            torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        )
    return getattr(torch, dtype)


def training_dtype(bf16: str, cuda: bool) -> Any:
    """The dtype a student trains in: ``sft.bf16`` on, off or auto (bf16 on a GPU that has it)."""
    import torch

    on = bf16 == "on" or (bf16 == "auto" and cuda and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if on else torch.float32


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

        # a 4-bit base keeps the adapter in the dtype it was trained and saved in (TRL trains QLoRA
        # adapters in bf16); PEFT would otherwise widen it to fp32
        model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=quantization is None)
    if device is not None and quantization is None:
        model = model.to(device)
    return model


def reload_tolerance(dtype: Any, load_in_4bit: bool = False, scale: float = 1.0) -> float:
    """The logit drift accepted between a trained model and its saved copy, by what they compute in and
    the size of the logits compared (``scale``: the largest absolute logit)."""
    key = "nf4" if load_in_4bit else str(dtype).removeprefix("torch.")
    floor, share = RELOAD_TOLERANCE.get(key, RELOAD_TOLERANCE["float32"])
    return max(floor, share * scale)
