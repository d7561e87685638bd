"""One training step of compeff's KD trainer on four fixed samples; the gradients, just before the
optimizer uses them, saved per configuration (run directly, or under torchrun for 2 ranks).

    python kd_step.py MODEL OUT BATCHxACCUMULATION ...
    torchrun --nproc_per_node 2 kd_step.py MODEL OUT BATCHxACCUMULATION
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig

from compeff.train.logit_kd import collate, kd_trainer_class, row_index, teacher_feature

K = 4


def features(vocab: int) -> list[dict]:
    """Four samples of different prompt and answer lengths; the teacher's top-k at every answer token
    but the last (as a label answer's end token has none), the second sample at its first only."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, (prompt, answer) in enumerate([(9, 5), (12, 2), (7, 6), (10, 3)]):
        ids = torch.randint(5, vocab, (prompt + answer,), generator=gen).tolist()
        informed = [prompt] if i == 1 else list(range(prompt, prompt + answer - 1))
        t_ids = [torch.randperm(vocab, generator=gen)[:K].tolist() for _ in informed]
        t_lp = [torch.log_softmax(torch.randn(K, generator=gen), 0).tolist() for _ in informed]
        rows.append(teacher_feature(ids, prompt, informed, t_ids, t_lp))
    return rows


class SaveGradients(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if int(os.environ.get("RANK", "0")) == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            torch.save(grads, self.path)


def step(model_path: str, out: Path, batch: int, accumulation: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-3, optim="sgd",
        max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, packing=False,
        logging_steps=1, seed=0, disable_tqdm=True, ddp_find_unused_parameters=False, bf16=False,
    )  # fmt: skip
    rows = features(model.config.vocab_size)
    trainer = kd_trainer_class()(
        model=model, args=args, processing_class=tokenizer, kd_alpha=0.7, kd_temperature=2.0,
        train_dataset=row_index(rows), data_collator=collate(tokenizer.pad_token_id, rows),
        callbacks=[SaveGradients(out / f"{batch}x{accumulation}-{os.environ.get('WORLD_SIZE', '1')}.pt")],
    )  # fmt: skip
    trainer.train()


if __name__ == "__main__":
    for config in sys.argv[3:]:
        b, a = config.split("x")
        step(sys.argv[1], Path(sys.argv[2]), int(b), int(a))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # torchrun ranks that exit with the gloo group alive have aborted once in teardown ("terminate
        # called without an active exception", 1 run in 3): close it as PyTorch asks
        dist.destroy_process_group()
