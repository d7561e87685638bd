"""A fast stand-in teacher for the chain tests: a small random chat LM taught the answer formats of
compeff's prompts (:mod:`format_lessons`). It lives in the tests only: what it says is noise in the
right shape, which is what a test of the machinery needs, and nothing a user should run."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from compeff.models import build_tiny_chat_model, default_corpus

VERSION = "v5"
TEACH_STEPS = 900  # v4's random batches parsed 7-8 of 8 answers per prompt kind; v5 passes the chain tests
MEGA_BATCHES = (
    50  # batches drawn together and sorted by length (random batches carried 1.6x the padded tokens)
)


def teach_formats(
    path: str | Path, steps: int = 300, batch_size: int = 8, lr: float = 3e-3, seed: int = 0
) -> None:
    """Fine-tune a saved tiny chat LM on format lessons (loss on assistant tokens only), in place."""
    import torch
    from format_lessons import lessons
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        examples.append((ids, [-100] * len(p_ids) + ids[len(p_ids) :]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(1, steps))
    rng = torch.Generator().manual_seed(seed)
    for picks in _length_grouped_draws(examples, steps, batch_size, rng):
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


def _length_grouped_draws(examples: list, steps: int, batch_size: int, rng) -> list[list[int]]:
    """``steps`` batches of random example indices (drawn with replacement, as before), where each run of
    MEGA_BATCHES batches is drawn at once, sorted by length and cut into batches in shuffled order."""
    import torch

    batches: list[list[int]] = []
    while len(batches) < steps:
        count = min(MEGA_BATCHES, steps - len(batches))
        draw = torch.randint(len(examples), (count * batch_size,), generator=rng).tolist()
        draw.sort(key=lambda i: len(examples[i][0]))
        chunk = [draw[k : k + batch_size] for k in range(0, len(draw), batch_size)]
        batches.extend(chunk[j] for j in torch.randperm(len(chunk), generator=rng).tolist())
    return batches


def tiny_chat_path(home: Path) -> Path:
    """The format-taught tiny chat LM in ``home``, built once (safe when several processes race)."""
    from format_lessons import lesson_corpus

    target = Path(home) / f"tiny-chat-{VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-chat-", dir=target.parent))
    build_tiny_chat_model(tmp, corpus=default_corpus() + lesson_corpus(), vocab_size=1024, hidden_size=128)
    teach_formats(tmp, steps=TEACH_STEPS)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target
