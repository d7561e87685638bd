"""``sft.loss: kd``: SFT plus the teacher's top-k distribution at every answer token (offline logit KD).

Closed-task samples answered as label distributions (``label_probs``, see
:mod:`compeff.synth.label_answers`) are learnt as soft labels: the distribution sits at the answer's first
token, over each label's first token in the student's own tokenizer (so any student can learn it).

Each sample carries the teacher's top-k token ids and log-probabilities (``generate.teacher_top_logprobs``,
see :mod:`compeff.top_logprobs`). Before training every sample is checked: the student's vocabulary must be
the one the ids belong to (compared by content, not by name), and the teacher's sampled tokens must spell
the sample's answer: either the student's tokenizer produces those very tokens, or they decode to the
answer's text in another segmentation (then the teacher's tokens are trained on). A sample that does not
line up (an edited answer, another tokenizer) is refused and counted. The loss is the usual cross-entropy on the answer tokens plus ``alpha * T^2 *`` the sparse
forward KL of :func:`compeff.train.kd_losses.sparse_topk_kl`, computed inside TRL's ``SFTTrainer``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from compeff import top_logprobs
from compeff.data import DataError
from compeff.top_logprobs import VocabularyMismatch
from compeff.train.chat_tokens import chat_text, chat_token_ids

LABEL_FIELD = "label_probs"  # a closed task's teacher distribution over its labels (generate)
OUT_OF_VOCABULARY = "token ids beyond the student's vocabulary"  # kd_features' refusal of such a sample


def check_vocabulary(tokenizer: Any, rows: list[dict[str, Any]]) -> str:
    """The vocabulary fingerprint common to the samples and the student, or a clear refusal."""
    found = Counter(str(r[top_logprobs.FIELD]["vocab"]) for r in rows if top_logprobs.FIELD in r)
    if not found and any(LABEL_FIELD in r for r in rows):  # label distributions: any vocabulary
        return top_logprobs.vocab_fingerprint(tokenizer)
    if not found:
        raise DataError(
            f"sft.loss: kd needs the teacher's log-probabilities in the samples ({top_logprobs.FIELD}); "
            "set generate.teacher_top_logprobs (e.g. 20) and generate again"
        )
    # a served teacher's vocabulary is known by a probe of its tokenizer (probe:...): the student is
    # probed alike; a local teacher's by its whole vocabulary
    student = {fp: top_logprobs.fingerprint_like(tokenizer, fp) for fp in found}
    if any(student[fp] != fp for fp in found):
        raise VocabularyMismatch(
            f"sft.loss: kd needs a student with the teacher's vocabulary: the samples' token ids come from "
            f"vocabulary {', '.join(sorted(found))}, the student's is "
            f"{', '.join(sorted(set(student.values())))}. Logit distillation across tokenizers (ULD, MinED "
            "alignment) is out of scope; use sft.loss: sft or a student of the teacher's family"
        )
    return top_logprobs.vocab_fingerprint(tokenizer)


def answer_ids(tokenizer: Any, pair: dict[str, Any], tokens: list[int]) -> tuple[list[int], int, str] | None:
    """(token ids of the whole chat, where the answer starts, how it lined up) with the answer spelt in
    the teacher's sampled tokens, or None when they do not spell the answer.

    ``exact``: the student's tokenizer gives the teacher's very tokens. ``resegmented``: the tokens decode
    to the answer's text, but the tokenizer would split it otherwise (a sampled ``"\\n\\n"`` where it
    writes two ``"\\n"``); the teacher's tokens are used, so every logit stays at the token it was
    computed for. The rest of the turn (end-of-turn marker) comes from the chat template."""
    prompt = chat_token_ids(tokenizer, pair["prompt"], True)
    full = chat_token_ids(tokenizer, pair["prompt"] + pair["completion"], False)
    start = len(prompt)
    if full[:start] != prompt:
        return None
    if full[start : start + len(tokens)] == tokens:
        return full, start, "exact"
    rendered_prompt = chat_text(tokenizer, pair["prompt"], True)
    rendered = chat_text(tokenizer, pair["prompt"] + pair["completion"], False)
    decoded = tokenizer.decode(tokens)
    if not rendered.startswith(rendered_prompt) or not rendered[len(rendered_prompt) :].startswith(decoded):
        return None
    rest = rendered[len(rendered_prompt) + len(decoded) :]
    return prompt + tokens + tokenizer(rest, add_special_tokens=False)["input_ids"], start, "resegmented"


def kd_features(
    tokenizer: Any, rows: list[dict[str, Any]], pairs: list[dict[str, Any]], max_length: int
) -> tuple[list[dict[str, Any]], dict[str, list[str]], int]:
    """Token ids, answer mask and the teacher's top-k arrays, aligned to the input positions, for every
    sample that lines up (see :func:`answer_ids`); the ids of the refused ones by reason; and how many
    were trained on the teacher's own segmentation. Ids a server named (vLLM's ``token_id:N``,
    llama.cpp's ``id``) at or beyond ``len(tokenizer)`` refuse their sample here, not in a gather while
    training."""
    features, refused = [], {"no log-probabilities": [], "answer tokens differ": [], "answer cut away": []}
    refused[OUT_OF_VOCABULARY] = []
    bound = len(tokenizer)  # ids the student's tokenizer has (its embedding may be padded wider)
    resegmented = 0
    for row, pair in zip(rows, pairs, strict=True):
        field = row.get(top_logprobs.FIELD)
        if not field and row.get(LABEL_FIELD):
            feature = label_feature(tokenizer, pair, row[LABEL_FIELD], max_length)
            if feature is None:
                refused["answer cut away"].append(str(row["id"]))
            else:
                features.append(feature)
            continue
        if not field:
            refused["no log-probabilities"].append(str(row["id"]))
            continue
        tokens, ids, logprobs = top_logprobs.unpack(field)
        if (tokens.size and tokens.max() >= bound) or (ids.size and ids.max() >= bound):
            refused[OUT_OF_VOCABULARY].append(str(row["id"]))
            continue
        lined_up = answer_ids(tokenizer, pair, tokens.tolist())
        if lined_up is None:
            refused["answer tokens differ"].append(str(row["id"]))
            continue
        full, start, how = lined_up
        resegmented += how == "resegmented"
        full = full[:max_length]
        if len(full) <= start:
            refused["answer cut away"].append(str(row["id"]))
            continue
        n = min(len(tokens), len(full) - start)
        features.append(teacher_feature(full, start, np.arange(start, start + n), ids[:n], logprobs[:n]))
    return features, {k: v for k, v in refused.items() if v}, resegmented


def teacher_feature(
    input_ids: list[int], start: int, positions: Any, ids: Any, logprobs: Any
) -> dict[str, Any]:
    """A kd training row: token ids, the answer mask from ``start``, and the teacher's top-k only where the
    teacher said something (``teacher_pos``: those positions; ``teacher_ids`` int32 and
    ``teacher_logprobs`` float32, one row per position). No array covers the prompt and no Python list
    holds a log-probability (``compeff bench kd-memory``: 10k samples of 500 answer tokens at k = 20 add
    1.1 GB at peak, where full-length lists took 2.3 GB per 1k samples)."""
    n, empty = len(positions), np.zeros((0, 1), dtype=np.float32)
    return {
        "input_ids": input_ids,
        "completion_mask": [0] * start + [1] * (len(input_ids) - start),
        "teacher_pos": np.asarray(positions, dtype=np.int32),
        "teacher_ids": np.asarray(ids, dtype=np.int32).reshape(len(positions), -1)
        if n
        else empty.astype(np.int32),
        "teacher_logprobs": np.asarray(logprobs, dtype=np.float32).reshape(len(positions), -1)
        if n
        else empty,
    }


def label_feature(
    tokenizer: Any, pair: dict[str, Any], probs: dict[str, float], max_length: int
) -> dict[str, Any] | None:
    """A closed-task sample with the teacher's label distribution: the first answer position where the
    label words part carries it (each label's token there as the student's tokenizer writes it in the
    answer, with that label's probability; labels sharing that token pool theirs); the other answer tokens
    are cross-entropy only. A row whose answer does not start like its labels is refused (None).
    Built from the student's own tokenizer, so any student can learn a teacher's label distribution."""
    prompt = chat_token_ids(tokenizer, pair["prompt"], True)
    full = chat_token_ids(tokenizer, pair["prompt"] + pair["completion"], False)[:max_length]
    start = len(prompt)
    if len(full) <= start or full[:start] != prompt:
        return None
    role = pair["completion"][0].get("role", "assistant")
    spelt = {
        label: chat_token_ids(tokenizer, pair["prompt"] + [{"role": role, "content": label}], False)
        for label in probs
    }
    # the first answer position where the labels part: a template may open the turn with tokens of its
    # own (an empty think block), and the distribution belongs where the label words begin
    at = start
    while at < len(full) and all(len(ids) > at and ids[at] == full[at] for ids in spelt.values()):
        at += 1
    # the answer must begin like one of its labels (an answer "Positive." to labels "positive" is refused)
    if at >= len(full) or not any(ids[: at + 1] == full[: at + 1] for ids in spelt.values()):
        return None
    mass: dict[int, float] = {}
    for label, p in probs.items():
        if len(spelt[label]) > at and p > 0:
            mass[spelt[label][at]] = mass.get(spelt[label][at], 0.0) + float(p)
    if not mass:  # no probability on any label: cross-entropy only
        return teacher_feature(full, start, [], [], [])
    logprobs = np.log(np.fromiter(mass.values(), dtype=np.float64, count=len(mass)))
    return teacher_feature(full, start, [at], [list(mass)], [logprobs])


def pack_features(features: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """``sft.packing`` for kd: TRL's best-fit-decreasing packer (``trl.pack_dataset``, as plain SFT packs)
    decides which samples share a row of at most ``max_length`` tokens; the rows are then joined here,
    the teacher's positions shifted by where each sample starts. ``position_ids`` restart at 0 for each
    sample so attention stays inside it (transformers builds the block-diagonal mask from them). A sample
    never spans two rows; the teacher's arrays stay at their tokens and never pass through Arrow."""
    from datasets import Dataset
    from trl import pack_dataset

    # only which sample each token belongs to goes through the packer
    index = Dataset.from_dict(
        {
            "input_ids": [f["input_ids"] for f in features],
            "sample": [[i] * len(f["input_ids"]) for i, f in enumerate(features)],
        }
    )
    packed = []
    for row in pack_dataset(index, max_length, strategy="bfd"):
        order, cursor = [], 0
        for n in row["seq_lengths"]:
            order.append(row["sample"][cursor])
            cursor += n
        parts = [features[i] for i in order]
        offsets = np.cumsum([0] + [len(f["input_ids"]) for f in parts[:-1]])
        packed.append(
            {
                "input_ids": [t for f in parts for t in f["input_ids"]],
                "completion_mask": [m for f in parts for m in f["completion_mask"]],
                "position_ids": [p for f in parts for p in range(len(f["input_ids"]))],
                "teacher_pos": np.concatenate([f["teacher_pos"] + o for f, o in zip(parts, offsets)]),
                "teacher_ids": _stack([f["teacher_ids"] for f in parts], 0),
                "teacher_logprobs": _stack([f["teacher_logprobs"] for f in parts], -np.inf),
            }
        )
    return packed


def _stack(arrays: list[Any], fill: float) -> Any:
    """Rows of several samples' teacher arrays, narrower ones widened with no-information entries."""
    k = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=fill) for a in arrays])


def row_index(features: list[dict[str, Any]]) -> Any:
    """The training dataset TRL's trainer requires, holding only each row's index: the rows themselves
    (numpy teacher arrays) stay in memory as they are and are looked up by :func:`collate`."""
    from datasets import Dataset

    return Dataset.from_dict({"row": list(range(len(features)))})


def collate(pad_id: int, features: list[dict[str, Any]] | None = None):
    """A collator padding ids and labels (answer tokens only) to the batch width and spreading the
    teacher's arrays to ``[batch, width, k]`` tensors (no-information entries where the teacher said
    nothing). Given ``features``, the batch holds indices into them (:func:`row_index`). Packed rows
    (with ``position_ids``) get no attention mask: the positions mark where each sample starts, and the
    padding at a row's end is a sequence of its own."""
    import torch

    def collate_batch(batch: list[dict[str, Any]]) -> dict[str, Any]:
        if features is not None:
            batch = [features[b["row"]] for b in batch]
        width = max(len(b["input_ids"]) for b in batch)
        k = max(np.shape(b["teacher_ids"])[1] for b in batch)
        packed = "position_ids" in batch[0]
        out = {
            "input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
            "labels": torch.full((len(batch), width), -100, dtype=torch.long),
            "teacher_ids": torch.zeros((len(batch), width, k), dtype=torch.long),
            "teacher_logprobs": torch.full((len(batch), width, k), -torch.inf),
        }
        if packed:
            out["position_ids"] = torch.zeros((len(batch), width), dtype=torch.long)
        else:
            out["attention_mask"] = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids = torch.tensor(b["input_ids"])
            out["input_ids"][i, :n] = ids
            if packed:
                out["position_ids"][i, :n] = torch.tensor(b["position_ids"])
                out["position_ids"][i, n:] = torch.arange(width - n)
            else:
                out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.where(torch.tensor(b["completion_mask"]) == 1, ids, -100)
            pos = torch.as_tensor(np.asarray(b["teacher_pos"], dtype=np.int64))
            t_ids, t_lp = np.asarray(b["teacher_ids"]), np.asarray(b["teacher_logprobs"], dtype=np.float32)
            out["teacher_ids"][i, pos, : t_ids.shape[1]] = torch.as_tensor(t_ids.astype(np.int64))
            out["teacher_logprobs"][i, pos, : t_lp.shape[1]] = torch.as_tensor(t_lp)
        return out

    return collate_batch


def kd_term(logits: Any, teacher_ids: Any, teacher_logprobs: Any, temperature: float) -> tuple[Any, Any]:
    """(summed sparse KL over the positions with teacher information, their count), logits and arrays
    already aligned (the logits at a position predict the token whose teacher arrays sit beside them)."""
    from compeff.train.kd_losses import sparse_topk_kl

    kl = sparse_topk_kl(logits, teacher_ids, teacher_logprobs, temperature)
    has = teacher_logprobs.isfinite().any(-1)
    return (kl * has).sum(), has.sum()


def kd_trainer_class():
    """TRL's SFTTrainer with the distillation term added to its loss (``kd_alpha``, ``kd_temperature``
    are keyword arguments of the trainer)."""
    from trl import SFTTrainer

    class TopKDistillTrainer(SFTTrainer):
        def __init__(self, *args: Any, kd_alpha: float = 1.0, kd_temperature: float = 1.0, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from compeff.train.answer_head import (
                across_devices,
                answer_forward,
                answer_token_count,
                log_answer_metrics,
            )

            teacher_ids = inputs.pop("teacher_ids")
            teacher_logprobs = inputs.pop("teacher_logprobs")
            # one forward pass, the output layer only at answer positions: the answer tokens'
            # cross-entropy (summed, divided by the answer tokens of the accumulated batch of every rank)
            # and the logits the KL reads
            ce, logits, columns = answer_forward(model, inputs, num_items_in_batch)
            log_answer_metrics(self, model, inputs, logits, columns)
            kl_sum, informed = kd_term(
                logits, teacher_ids[:, columns + 1], teacher_logprobs[:, columns + 1], self.kd_temperature
            )
            # the KL is divided as the CE is: a micro-batch's share of the accumulated batch, so a step
            # with accumulation equals one batch of the same samples, and DDP's averaging is undone by
            # across_devices as for the CE
            count = answer_token_count(inputs["labels"][:, columns + 1], num_items_in_batch).to(ce.device)
            kl = kl_sum / count
            loss = (ce + self.kd_alpha * self.kd_temperature**2 * kl) * across_devices(
                self, num_items_in_batch
            )
            mode = "train" if model.training else "eval"
            if hasattr(self, "_metrics"):  # logged as the mean KL per position with teacher information
                mean_kl = float(kl_sum.detach()) / max(1, int(informed))
                self._metrics[mode].setdefault("kd_kl", []).append(mean_kl)
            return (loss, {"logits": logits}) if return_outputs else loss

    return TopKDistillTrainer
