"""``compeff sft``: fine-tune the student on a chat dataset with TRL, loss on the answer only.

Each chat becomes a conversational prompt/completion pair (the messages before the answer, and the
answer), which TRL renders with the student's chat template and masks so that only completion
tokens carry labels. Before any step, checks refuse what other tools let through silently: no chat
template, no pad token, answers cut away entirely by ``max_length``, a collated batch whose labels
reach into prompts (packing included); truncation above 5% of samples is warned about. Output in
``runs/<name>/sft/``: ``model/`` (full model, or LoRA adapter, merged with ``merge``), tokenizer,
model card ``model/README.md``, ``data.jsonl`` (the training log), ``loss.png``; checkpoints let a
killed run resume.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from compeff.config import ConfigError, Recipe
from compeff.data import DataError
from compeff.loading import load_causal_lm, reload_tolerance, training_dtype
from compeff.models import CHATML_TEMPLATE, resolve_model, student_model
from compeff.progress import console
from compeff.runs import Stage, read_chat_set, read_manifest, upstream_data, weights_fingerprint
from compeff.train.chat_tokens import chat_token_ids

TRUNCATION_WARN = 0.05


class SftCheckError(DataError):
    """A pre-training check failed; the message says which samples and which setting helps."""


def student_config(student: Any) -> dict[str, Any]:
    """The student settings an SFT stage is fingerprinted by. ``cut_layers``, a key added after run
    folders existed, is left out while unset, so those folders resume instead of conflicting."""
    config = student.model_dump(exclude={"heal": {"device"}})
    if config.get("cut_layers") is None:
        config.pop("cut_layers", None)
    return config


def sft_input(recipe: Recipe) -> Path:
    """The chat set to train on: ``sft.input`` or the run's sample output."""
    return upstream_data(recipe.run_dir, recipe.sft.input, "sample", "retained set", "sft.input")


def to_prompt_completion(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chats -> TRL's conversational prompt/completion form (the last assistant turn is the completion)."""
    out = []
    for row in rows:
        messages = row["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"sample {row['id']}: the last message is not an assistant answer")
        out.append({"prompt": messages[:-1], "completion": [messages[-1]]})
    return out


def prepare_tokenizer(tokenizer: Any, settings) -> list[str]:
    """Give the student's tokenizer what SFT needs, or refuse; returns notes on what was changed."""
    notes = []
    if not getattr(tokenizer, "chat_template", None):
        if settings.chat_template != "chatml":
            raise SftCheckError(
                "the student's tokenizer has no chat template; set sft.chat_template: chatml to give it one"
            )
        tokenizer.chat_template = CHATML_TEMPLATE
        notes.append("chat template: ChatML added")
    if tokenizer.pad_token is None:
        if settings.pad_token is None:
            raise SftCheckError(
                "the student's tokenizer has no pad token; set sft.pad_token (a token of its vocabulary, or "
                "'eos' to pad with the end token)"
            )
        tokenizer.pad_token = tokenizer.eos_token if settings.pad_token == "eos" else settings.pad_token
        notes.append(f"pad token: {tokenizer.pad_token!r}")
    return notes


def preflight(tokenizer: Any, pairs: list[dict[str, Any]], ids: list[str], max_length: int) -> dict[str, Any]:
    """Token counts per sample: completion tokens kept after truncation, and which samples lose it all."""
    lengths, kept, emptied, truncated = [], [], [], 0
    for sample_id, pair in zip(ids, pairs, strict=True):
        prompt = chat_token_ids(tokenizer, pair["prompt"], True)
        full = chat_token_ids(tokenizer, pair["prompt"] + pair["completion"], False)
        start = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt))
        lengths.append(len(full))
        truncated += len(full) > max_length
        kept.append(max(0, min(len(full), max_length) - start))
        if kept[-1] == 0:
            emptied.append(sample_id)
    return {
        "samples": len(pairs),
        "truncated": truncated,
        "truncated_share": truncated / max(1, len(pairs)),
        "emptied": emptied,
        "completion_tokens": kept,
        "tokens": sum(min(n, max_length) for n in lengths),
    }


def check_collated_masks(trainer: Any, expected_completion: list[int], packing: bool, n: int = 16) -> None:
    """After collation no prompt token may carry a label: the labelled tokens of the first batches must
    be exactly the completion tokens the preflight counted."""
    dataset = trainer.train_dataset
    if packing:
        labelled = sum(sum(1 for x in row["labels"] if x != -100) for row in dataset)
        expected = sum(expected_completion)
        if labelled != expected:
            raise SftCheckError(
                f"packing changed the completion masks: {labelled} labelled tokens for {expected} answer "
                "tokens (turn sft.packing off)"
            )
        return
    batch = trainer.data_collator([dataset[i] for i in range(min(n, len(dataset)))])
    labelled = (batch["labels"] != -100).sum(dim=1).tolist()
    if labelled != expected_completion[: len(labelled)]:
        raise SftCheckError(
            f"after collation the labels cover {labelled[:4]}... tokens where the answers have "
            f"{expected_completion[:4]}...: prompt tokens would be trained on"
        )


def _loss_png(history: list[dict[str, Any]]) -> bytes | None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("SFT loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def model_card(
    recipe: Recipe, rows: list[dict[str, Any]], report: dict[str, Any], final_loss: float | None
) -> str:
    """README.md of the trained student: teacher, data, selection, hyper-parameters, final loss."""
    teachers = sorted({str(r.get("teacher")) for r in rows if r.get("teacher")}) or ["(not recorded)"]
    sample_manifest = read_manifest(recipe.run_dir / "sample") or {}
    selection = (sample_manifest.get("config") or {}).get("sample")
    s = recipe.sft
    kind = "full fine-tuning" if s.lora_r is None else f"LoRA r={s.lora_r}, alpha={s.lora_alpha}"
    if s.lora_r and s.merge:
        kind += " (merged into the weights)"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [compeff, distillation, sentiment-analysis]",
        "---",
        "",
        f"# {recipe.run.name}: student distilled with compeff",
        "",
        f"- student base: `{recipe.student.model}`",
        f"- teacher: {', '.join(teachers)}",
        f"- training samples: {len(rows)} ({report['tokens']} tokens after truncation to {s.max_length})",
        "- selection: "
        + (
            f"{selection['method']} sampling, ratio {selection['ratio']}, by {selection['metric']}, group "
            f"{selection['group']}"
            if selection
            else "none recorded (the input was not made by `compeff sample`)"
        ),
        f"- method: {kind}; loss on the answer tokens only" + ("; packed" if s.packing else ""),
        f"- hyper-parameters: lr {s.learning_rate} ({s.lr_scheduler}, warm-up {s.warmup_ratio}), epochs {s.epochs}, "
        f"batch {s.per_device_batch_size} x {s.gradient_accumulation_steps}, weight decay {s.weight_decay}, "
        f"grad clip {s.max_grad_norm}, AdamW, seed {recipe.run.seed}",
        f"- final training loss: {final_loss:.4f}" if final_loss is not None else "- final training loss: -",
        "",
        "Evaluate it with `compeff eval` (k-shot label-word scoring on IMDb and TweetEval).",
    ]
    return "\n".join(lines) + "\n"


def reload_drift(
    trained: Any,
    out_dir: Path,
    base: str,
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    merged: bool,
    dtype: Any,
    load_in_4bit: bool = False,
) -> tuple[float, float]:
    """(largest logit difference between the in-memory model and the one saved in ``out_dir``, largest
    absolute logit) on a few training prompts, the copy loaded as it was trained (same dtype, same
    quantisation): a saved adapter or model that does not reload the same is an error. Compare with
    :func:`compeff.loading.reload_tolerance`."""
    import torch

    adapter = str(out_dir) if (out_dir / "adapter_config.json").exists() and not merged else None
    source = base if adapter else str(out_dir)
    reloaded = load_causal_lm(
        source, dtype, load_in_4bit=load_in_4bit and adapter is not None, adapter=adapter
    )
    reloaded.eval()
    trained.eval()
    device = next(trained.parameters()).device
    if not load_in_4bit:
        reloaded.to(device)
    worst, scale = 0.0, 0.0
    with torch.inference_mode():
        for pair in pairs:
            ids = torch.tensor([chat_token_ids(tokenizer, pair["prompt"], True)], device=device)
            a = trained(input_ids=ids).logits.float()
            b = reloaded(input_ids=ids).logits.float()
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
    return worst, scale


def run_sft_stage(
    recipe: Recipe, force: bool = False, progress: bool = True, stage_name: str = "sft"
) -> dict[str, Any]:
    """Fine-tune the student on the retained set and save model, card, log and loss curve."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental
    s = recipe.sft
    source = sft_input(recipe)
    rows = read_chat_set(source)
    if not rows:
        raise DataError(f"{source}: no sample to train on")
    path = resolve_model(student_model(recipe.student, recipe.data))
    cuda = torch.cuda.is_available()
    if s.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("sft.load_in_4bit: 4-bit QLoRA needs bitsandbytes (pip install 'compeff[qlora]')")
    if s.load_in_4bit and s.lora_r is None:
        raise ConfigError("sft.load_in_4bit: set sft.lora_r too (4-bit weights are trained through LoRA)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    notes = prepare_tokenizer(tokenizer, s)
    pairs = to_prompt_completion(rows)
    report = preflight(tokenizer, pairs, [str(r["id"]) for r in rows], s.max_length)
    if report["emptied"]:
        if not s.drop_overlong:
            raise SftCheckError(
                f"{len(report['emptied'])} sample(s) lose their whole answer to sft.max_length={s.max_length} "
                f"(first: {', '.join(report['emptied'][:5])}); raise max_length or set sft.drop_overlong: true"
            )
        gone = set(report["emptied"])
        keep = [i for i, r in enumerate(rows) if str(r["id"]) not in gone]
        rows, pairs = [rows[i] for i in keep], [pairs[i] for i in keep]
        report["completion_tokens"] = [report["completion_tokens"][i] for i in keep]
        notes.append(f"dropped {len(gone)} samples whose answer max_length cut away")
    if report["truncated_share"] > TRUNCATION_WARN:
        console.print(
            f"[yellow]sft: {report['truncated_share']:.0%} of samples are longer than max_length={s.max_length} "
            "and lose their end[/yellow]"
        )
    kd_refused: dict[str, list[str]] = {}
    kd_resegmented, kd_samples = 0, 0
    if s.loss == "kd":
        from compeff.train.logit_kd import check_vocabulary, kd_features, pack_features

        check_vocabulary(tokenizer, rows)
        kd_rows, kd_refused, kd_resegmented = kd_features(tokenizer, rows, pairs, s.max_length)
        if not kd_rows:
            raise SftCheckError(
                f"sft.loss: kd: no sample lines up with the teacher's tokens ({ {k: len(v) for k, v in kd_refused.items()} })"
            )
        kd_samples = len(kd_rows)
        if kd_resegmented:
            console.print(
                f"sft: kd: {kd_resegmented} answers trained on the teacher's own token segmentation"
            )
        if s.packing:
            kd_rows = pack_features(kd_rows, s.max_length)
        if kd_refused:
            console.print(f"[yellow]sft: kd refused {sum(map(len, kd_refused.values()))} samples: "
                          + ", ".join(f"{len(v)} {k}" for k, v in kd_refused.items()) + "[/yellow]")  # fmt: skip
    gkd_teacher = None
    if s.loss == "gkd":  # on-policy: the student answers, a local teacher model scores every token
        from compeff.top_logprobs import vocab_fingerprint
        from compeff.train.logit_kd import VocabularyMismatch

        if recipe.teacher.backend == "openai":
            raise ConfigError("sft.loss: gkd needs the teacher's weights here (teacher.backend hf or vllm)")
        if s.packing:
            raise ConfigError("sft.loss: gkd generates on-policy and cannot pack: set sft.packing: false")
        gkd_teacher = resolve_model(recipe.teacher.model)
        teacher_vocab = vocab_fingerprint(AutoTokenizer.from_pretrained(gkd_teacher))
        if teacher_vocab != vocab_fingerprint(tokenizer):
            raise VocabularyMismatch(
                f"sft.loss: gkd needs a student with the teacher's vocabulary ({recipe.teacher.model}: "
                f"{teacher_vocab}, student: {vocab_fingerprint(tokenizer)}); logit distillation across "
                "tokenizers is out of scope"
            )
        # one tokenizer, yet output layers of other widths (Qwen2.5 7B pads to 152,064, 0.5B to 151,936):
        # GKD compares the two logit vectors position by position and needs them the same width
        widths = {name: AutoConfig.from_pretrained(p).vocab_size for name, p in (("teacher", gkd_teacher), ("student", path))}  # fmt: skip
        if widths["teacher"] != widths["student"]:
            raise VocabularyMismatch(
                f"sft.loss: gkd needs output layers of one width: config.vocab_size is {widths['teacher']} "
                f"for the teacher ({recipe.teacher.model}) and {widths['student']} for the student; use "
                "sft.loss: kd (top-k ids, any width) or resize one model's embeddings to the other's"
            )
    dtype = training_dtype(s.bf16, cuda)
    bf16 = dtype == torch.bfloat16
    config = {"sft": s.model_dump(exclude={"logging_steps", "save_steps"}), "student": student_config(recipe.student), "seed": recipe.run.seed}  # fmt: skip
    config["student_weights"] = weights_fingerprint(path)  # the cut or healed copy trained from
    if gkd_teacher:
        config["teacher"] = weights_fingerprint(gkd_teacher)
    main = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch` only rank 0 writes
    stage = Stage.open(
        recipe.run_dir, stage_name, config=config, inputs={"data": source}, force=force, writer=main
    )
    out_dir = stage.folder / "model"
    with stage:
        if stage.was_complete and (out_dir / "README.md").exists():
            console.print(f"{stage_name}: already trained -> {out_dir}")
            stage.keep_previous_extra()
            return stage.close()
        model = load_causal_lm(path, dtype, load_in_4bit=s.load_in_4bit)
        peft_config = None
        if s.lora_r is not None:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=s.lora_r,
                lora_alpha=s.lora_alpha,
                lora_dropout=s.lora_dropout,
                target_modules=s.lora_target_modules,
                task_type="CAUSAL_LM",
            )
        config_kwargs = dict(
            activation_checkpointing=s.gradient_checkpointing,  # TRL turns it on unless told
            gradient_checkpointing=s.gradient_checkpointing,
            output_dir=str(stage.folder / "checkpoints"),
            learning_rate=s.learning_rate,
            lr_scheduler_type=s.lr_scheduler,
            warmup_steps=float(s.warmup_ratio) if s.warmup_ratio < 1 else 0,
            num_train_epochs=s.epochs,
            max_steps=s.max_steps,
            weight_decay=s.weight_decay,
            max_grad_norm=s.max_grad_norm,
            per_device_train_batch_size=s.per_device_batch_size,
            gradient_accumulation_steps=s.gradient_accumulation_steps,
            optim="adamw_torch",
            max_length=s.max_length,
            packing=s.packing,
            completion_only_loss=True,
            bf16=bf16,
            logging_steps=s.logging_steps,
            save_steps=s.save_steps,
            save_total_limit=2,
            seed=recipe.run.seed,
            report_to=[],
            disable_tqdm=not progress,
            use_cpu=not cuda,
            ddp_find_unused_parameters=False,
        )
        if s.loss == "gkd":
            from trl.experimental.gkd import GKDConfig

            args = GKDConfig(**config_kwargs, lmbda=s.gkd_lmbda, beta=s.gkd_beta, temperature=s.gkd_temperature,
                             max_new_tokens=s.gkd_max_new_tokens)  # fmt: skip
        else:
            args = SFTConfig(**config_kwargs)

        class LogToStage(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs:
                    stage.append([{"id": f"step-{state.global_step}-{len(state.log_history)}", "step": state.global_step, **logs}])  # fmt: skip

        common = dict(model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
                      callbacks=[LogToStage()])  # fmt: skip
        if s.loss == "gkd":
            from trl.experimental.gkd import GKDTrainer

            teacher_model = load_causal_lm(gkd_teacher, dtype, load_in_4bit=s.load_in_4bit)
            chats = Dataset.from_list([{"messages": r["messages"]} for r in rows])
            trainer = GKDTrainer(teacher_model=teacher_model, train_dataset=chats, **common)
        elif s.loss == "kd":
            from compeff.train.logit_kd import collate, kd_trainer_class, row_index

            args.remove_unused_columns = False
            args.dataset_kwargs = {"skip_prepare_dataset": True}
            args.packing = args.padding_free = False  # rows come packed by pack_features when sft.packing
            trainer = kd_trainer_class()(
                kd_alpha=s.kd_alpha,
                kd_temperature=s.kd_temperature,
                train_dataset=row_index(kd_rows),  # the rows' numpy arrays never pass through Arrow
                data_collator=collate(tokenizer.pad_token_id, kd_rows),
                **common,
            )
        else:
            from compeff.train.answer_head import answer_only_trainer_class

            trainer_class = answer_only_trainer_class() if s.answer_only_head else SFTTrainer
            trainer = trainer_class(train_dataset=Dataset.from_list(pairs), **common)
            check_collated_masks(trainer, report["completion_tokens"], s.packing)
        checkpoints = sorted(
            (stage.folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
        )
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
        history = trainer.state.log_history
        losses = [h["loss"] for h in history if "loss" in h and math.isfinite(h["loss"])]
        final_loss = losses[-1] if losses else None
        if not main:
            return {}
        trained = trainer.model
        if s.lora_r is not None and s.merge:
            trained = trained.merge_and_unload()
        trained.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        merged = s.lora_r is not None and s.merge
        drift, scale = reload_drift(
            trainer.model, out_dir, path, tokenizer, pairs[:4], merged, dtype, s.load_in_4bit
        )
        tolerance = reload_tolerance(dtype, s.load_in_4bit, scale)
        if drift > tolerance:
            raise SftCheckError(
                f"the saved model does not reproduce the trained one (max logit difference {drift:.2e}, "
                f"tolerance {tolerance:g} in {str(dtype).removeprefix('torch.')})"
            )
        (out_dir / "README.md").write_text(model_card(recipe, rows, report, final_loss), encoding="utf-8")
        png = _loss_png(history)
        if png:
            stage.write_artifact("loss.png", png)
        stage.extra.update(
            final_loss=final_loss,
            samples=len(rows),
            truncated_share=report["truncated_share"],
            notes=notes,
            reload_max_abs_diff=drift,
            reload_tolerance=tolerance,
            reload_logit_scale=scale,
            reload_dtype="nf4" if s.load_in_4bit else str(dtype).removeprefix("torch."),
            loss=s.loss,
            kd_refused={k: len(v) for k, v in kd_refused.items()},
            **({"kd_samples": kd_samples, "kd_resegmented": kd_resegmented} if s.loss == "kd" else {}),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            steps=trainer.state.global_step,
            train_runtime_s=next(
                (h.get("train_runtime") for h in reversed(history) if "train_runtime" in h), None
            ),
        )
        console.print(
            f"{stage_name}: {trainer.state.global_step} steps, final loss {final_loss if final_loss is None else round(final_loss, 4)} -> {out_dir}"
        )
    return stage.manifest or {}
