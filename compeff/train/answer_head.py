"""Pay only for the tokens that count: the output layer run only where a loss is read.

A closed-task sample is a prompt of 50-200 tokens and an answer of 1-3; the student's output layer
(49,152 columns for SmolLM2) over every position, and TRL's full-vocabulary entropy metric on top, cost
more than the decoder itself. Here the model's forward pass gets ``logits_to_keep`` = the columns where
some row of the batch has an answer token to predict (transformers applies the head to those columns
only), and the cross-entropy is computed on them: the same loss as the model's own (summed, divided by
the batch's answer-token count, or by ``num_items_in_batch`` under gradient accumulation), at a fraction
of the head's cost. The forward call goes through the wrapper (PEFT, DDP), so adapters and gradient
synchronisation work unchanged.
"""

from __future__ import annotations

from typing import Any

NOT_FORWARDED = ("labels", "completion_mask", "assistant_masks", "teacher_ids", "teacher_logprobs")


def answer_columns(labels: Any) -> Any:
    """The sequence positions whose logits predict an answer token in some row (labels shifted by one)."""
    import torch

    wanted = (labels[:, 1:] != -100).any(dim=0)
    return torch.nonzero(wanted, as_tuple=False).flatten()


def answer_forward(
    model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
) -> tuple[Any, Any, Any]:
    """(cross-entropy on the answer tokens, logits at the kept columns [batch, columns, vocab], the kept
    columns). The head runs only on those columns; padding and prompt columns never reach it."""
    import torch.nn.functional as F

    labels = inputs["labels"]
    columns = answer_columns(labels)
    # everything the collator made reaches the model (padding-free sequence lengths included), but labels
    forward = {k: v for k, v in inputs.items() if k not in NOT_FORWARDED and k != "use_cache"}
    if len(columns) == 0:  # nothing to learn in this batch: a zero loss still tied to the graph
        out = model(**forward, use_cache=False, logits_to_keep=1)
        return out.logits.sum() * 0.0, out.logits[:, :0], columns
    out = model(**forward, use_cache=False, logits_to_keep=columns)
    logits = out.logits
    targets = labels[:, columns + 1]
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / answer_token_count(targets, num_items_in_batch).to(total.device), logits, columns


def answer_token_count(targets: Any, num_items_in_batch: Any = None) -> Any:
    """What a summed loss is divided by: the answer tokens of the whole accumulated batch, of every rank
    (``num_items_in_batch``, as transformers counts them), or of this batch when that is not known."""
    import torch

    if num_items_in_batch is None:
        return (targets != -100).sum().clamp(min=1)
    return torch.as_tensor(num_items_in_batch).clamp(min=1)


def answer_only_trainer_class():
    """TRL's SFTTrainer whose loss runs the output layer only at answer positions (same loss value)."""
    from trl import SFTTrainer

    class AnswerOnlySFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, logits, columns = answer_forward(model, inputs, num_items_in_batch)
            log_answer_metrics(self, model, inputs, logits, columns)
            loss = loss * across_devices(self, num_items_in_batch)
            return (loss, {"logits": logits}) if return_outputs else loss

    return AnswerOnlySFTTrainer


def log_answer_metrics(trainer: Any, model: Any, inputs: dict[str, Any], logits: Any, columns: Any) -> None:
    """TRL's ``num_tokens`` (tokens seen, as SFTTrainer counts them) and ``mean_token_accuracy`` on the
    answer tokens, from the kept columns only (no full-vocabulary entropy)."""
    import torch

    metrics = getattr(trainer, "_metrics", None)
    if metrics is None:
        return
    mode = "train" if model.training else "eval"
    with torch.no_grad():
        if "attention_mask" in inputs:
            seen = inputs["attention_mask"].sum()
        else:
            seen = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
        seen = trainer.accelerator.gather_for_metrics(seen).sum().item()
        if mode == "train":
            trainer._total_train_tokens = getattr(trainer, "_total_train_tokens", 0) + seen
            metrics[mode]["num_tokens"] = [trainer._total_train_tokens]
        if len(columns):
            targets = inputs["labels"][:, columns + 1]
            valid = targets != -100
            right = ((logits.argmax(-1) == targets) & valid).sum()
            total = valid.sum()
            metrics[mode].setdefault("mean_token_accuracy", []).append((right / total.clamp(min=1)).item())


def across_devices(trainer: Any, num_items_in_batch: Any) -> int:
    """The factor TRL's and transformers' own losses apply: ``num_items_in_batch`` counts the answer tokens
    of every rank and DDP averages the gradients, so a rank's loss is multiplied by the number of ranks."""
    if num_items_in_batch is None or not getattr(trainer.args, "average_tokens_across_devices", False):
        return 1
    tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return max(1, trainer.accelerator.num_processes // tp)
