"""Healing a cut student (``student.heal``): KL to the model it was cut from, on user texts.

A decoder cut from a bigger one (:func:`compeff.llm_models.pruned_decoder`) feeds its last layers hidden
states they were never trained on: SmolLM2-135M cut to 10 of its 30 layers puts about 16 nats of
cross-entropy on a review's next tokens, more than a uniform guess over its 49,152 tokens (10.8). Before
the student learns any task, a few hundred steps of matching the full model's next-token distribution
on the run's own texts (no label and no teacher call: the model the cut was made from is loaded here)
narrows that gap, the first step of prune-then-distill recipes such as Minitron. The healed student is
built once per cut, settings and texts into ``$COMPEFF_HOME`` next to the cut, with a card and
``compeff_healed.json`` saying how it was made and what healing measured. One process builds it at a
time (a lock beside the target; others wait, then read the finished copy); a killed build starts again
from step 0 (no checkpoint: at the default 150-300 steps it is minutes on a GPU, a quarter of an hour on
two CPU cores).
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compeff.data import DataError
from compeff.fingerprints import fingerprint_obj, weights_fingerprint
from compeff.llm_models import publish_build
from compeff.loading import local_device, pick_dtype
from compeff.progress import Tracker
from compeff.runs import build_lock

if TYPE_CHECKING:
    from compeff.config import HealSettings

try:  # POSIX; elsewhere concurrent builders race and publish_build keeps the first copy
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

HEALED_CARD = "compeff_healed.json"
HEAL_VERSION = 1  # raised when the healing arithmetic changes, so older healed copies are not reused
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)


def heal_target(pruned: Path, settings: HealSettings, texts: list[str]) -> Path:
    """Where the healed copy of ``pruned`` lives: keyed by its weights, the heal settings and the texts."""
    digest = hashlib.sha256("\n\x00".join(texts).encode("utf-8")).hexdigest()
    tag = fingerprint_obj(
        {
            "version": HEAL_VERSION,
            "weights": weights_fingerprint(pruned),
            "heal": settings.model_dump(exclude={"device", "texts"}),
            "texts": digest,
        }
    )[:12]
    return pruned.parent / f"{pruned.name}-healed-{tag}"


def split_texts(texts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle of ``texts`` cut into (training, held out): a tenth held out, at most 64, at least 1."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    n_held = max(1, min(64, len(order) // 10))
    return order[n_held:], order[:n_held]


def _kl_per_token(student: Any, teacher: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Summed KL(teacher || student) over the next-token distributions of the real tokens, and their count."""
    import torch
    import torch.nn.functional as F

    mask = batch["attention_mask"][:, 1:].bool()
    with torch.no_grad():
        target = F.log_softmax(teacher(**batch).logits[:, :-1][mask].float(), dim=-1)
    guess = F.log_softmax(student(**batch).logits[:, :-1][mask].float(), dim=-1)
    kl = F.kl_div(guess, target, log_target=True, reduction="sum")
    return kl, int(mask.sum())


def held_out_kl(student: Any, teacher: Any, batches: list[dict[str, Any]]) -> float:
    """Mean KL per token (nats) of the student from the full model on held-out texts."""
    import torch

    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            kl, n = _kl_per_token(student, teacher, batch)
            total, count = total + float(kl), count + n
    student.train(was_training)
    return total / max(1, count)


def heal_decoder(
    base_path: str, pruned: Path, texts: list[str], settings: HealSettings, progress: bool = True
) -> Path:
    """The cut decoder ``pruned`` after ``settings.steps`` steps of KL to ``base_path`` on ``texts`` (built
    once; later calls, and processes waiting on the build, return the same folder). AdamW, 5% linear
    warm-up then linear decay, gradient norm clipped at 1, fp32 student weights (bf16 autocast and a bf16
    frozen full model on a GPU that has it); saved in the cut's dtype with the cut's tokenizer files."""
    target = heal_target(pruned, settings, texts)
    if (target / "config.json").is_file():
        return target
    if len(texts) < 2:
        raise DataError(
            f"student.heal: {len(texts)} text(s) to heal on; it needs at least 2 (one held out to measure it)"
        )
    with build_lock(target):
        if (target / "config.json").is_file():  # built while this process waited
            return target
        for stale in target.parent.glob(f".{target.name}-*"):  # left by a killed build of this target
            shutil.rmtree(stale, ignore_errors=True)
        return _heal(base_path, pruned, texts, settings, target, progress)


def _heal(
    base_path: str, pruned: Path, texts: list[str], settings: HealSettings, target: Path, progress: bool
) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = local_device(settings.device)  # this rank's GPU, a visible GPU, or the CPU
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    full_dtype = pick_dtype("auto", device)
    teacher = AutoModelForCausalLM.from_pretrained(base_path, dtype=full_dtype).to(device).eval()
    teacher.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).to(device)
    cut_config = AutoConfig.from_pretrained(pruned)  # `dtype` from transformers 4.56, `torch_dtype` before
    saved_dtype = (
        getattr(cut_config, "dtype", None) or getattr(cut_config, "torch_dtype", None) or torch.float32
    )
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype, torch.float32)
    train_texts, held = split_texts(texts, settings.seed)

    def encode(chunk: list[str]) -> dict[str, Any]:
        enc = tokenizer(
            chunk, return_tensors="pt", padding=True, truncation=True, max_length=settings.max_length
        )
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    held_batches = [
        encode(held[i : i + settings.batch_size]) for i in range(0, len(held), settings.batch_size)
    ]
    autocast = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        kl_before = held_out_kl(student, teacher, held_batches)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, settings.steps // 20)
    decay = max(1, settings.steps - warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (settings.steps - s) / decay)
    )
    order = random.Random(settings.seed + 1)
    queue: list[str] = []
    losses: list[float] = []
    started = time.perf_counter()
    student.train()
    with Tracker("heal the cut student", settings.steps, enabled=progress) as tracker:
        for _ in range(settings.steps):
            if len(queue) < settings.batch_size:
                fresh = list(train_texts)
                order.shuffle(fresh)
                queue.extend(fresh)
            chunk, queue = queue[: settings.batch_size], queue[settings.batch_size :]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                kl, n = _kl_per_token(student, teacher, encode(chunk))
                loss = kl / max(1, n)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tracker.advance(ok=1)
    seconds = time.perf_counter() - started
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        kl_after = held_out_kl(student, teacher, held_batches)
    record = {
        "base": str(base_path),
        "cut": str(pruned),
        "settings": settings.model_dump(exclude={"texts"}),
        "version": HEAL_VERSION,
        "texts": {"train": len(train_texts), "held_out": len(held)},
        "batch_size": min(settings.batch_size, len(train_texts)),
        "held_out_kl_before": round(kl_before, 4),
        "held_out_kl_after": round(kl_after, 4),
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
        "seconds": round(seconds, 1),
        "device": device,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    student.to("cpu", dtype=saved_dtype).save_pretrained(tmp)
    for extra in (*TOKENIZER_FILES, "compeff_pruned.json", "generation_config.json"):
        if (pruned / extra).is_file():
            shutil.copyfile(pruned / extra, tmp / extra)
    (tmp / HEALED_CARD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(
        f"# Healed cut student\n\n{(pruned / 'README.md').read_text(encoding='utf-8').split(chr(10), 2)[-1].strip()}\n\n"
        f"Healed by compeff: {settings.steps} steps of KL to the full model on {len(train_texts)} user texts "
        f"(no labels), lr {settings.learning_rate:g}, batches of {record['batch_size']}, {settings.max_length} "
        f"tokens. KL per token on {len(held)} held-out texts: {kl_before:.2f} -> {kl_after:.2f} nats. Still to be "
        "fine-tuned on a task (`compeff sft`) before use.\n",
        encoding="utf-8",
    )
    published = publish_build(tmp, target)
    del teacher, student, optimizer, schedule  # the stage that asked for the copy runs next in this process
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return published
