"""Offline logit distillation: capture of the teacher's top-k log-probabilities, the sparse KL by hand,
the loss inside TRL's trainer, and the refusals (another vocabulary, answers that do not line up)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compeff import top_logprobs
from compeff.config import load_recipe
from compeff.teachers import ChatRequest, SamplingParams
from compeff.teachers.hf_local import HFTeacher
from compeff.train.kd_losses import sparse_topk_kl
from compeff.train.logit_kd import VocabularyMismatch, collate, kd_features

K = 4


def test_sparse_kl_by_hand():
    z = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    ids = torch.tensor([[0, 3, 1], [2, 1, 0]])
    lp = torch.tensor([[math.log(0.6), math.log(0.3), -math.inf], [-math.inf, -math.inf, -math.inf]])
    got = sparse_topk_kl(z, ids, lp, temperature=2.0)
    # by hand: teacher at T=2 is p^(1/2) renormalised over its two tokens; student softmax(z/2)
    p = np.array([0.6, 0.3]) ** 0.5
    p /= p.sum()
    q = np.exp(np.array([2.0, 0.0, -1.0, 0.5]) / 2)
    q /= q.sum()
    expected = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[3])
    assert got[0].item() == pytest.approx(expected, rel=1e-5)
    assert got[1].item() == 0.0  # no teacher information: no term


def captured_samples(tiny_lm, texts):
    """Answers of the tiny model with their top-k log-probabilities, packed as generate packs them."""
    teacher = HFTeacher(str(tiny_lm), batch_size=2, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    lookup, vocab = top_logprobs.token_id_lookup(tokenizer), top_logprobs.vocab_fingerprint(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=True, top_logprobs=K)
    rows = []
    for r in teacher.generate([ChatRequest(id=f"s{i}", messages=[{"role": "user", "content": t}], params=params)
                               for i, t in enumerate(texts)]):  # fmt: skip
        assert r.ok and r.text
        field = top_logprobs.pack(r.logprobs[0]["content"], K, lookup, vocab)
        messages = [
            {"role": "user", "content": texts[int(r.id[1:])]},
            {"role": "assistant", "content": r.text},
        ]
        rows.append({"id": r.id, "messages": messages, top_logprobs.FIELD: field})
    return rows


def test_capture_packs_the_teachers_own_distribution(tiny_lm):
    rows = captured_samples(tiny_lm, ["the film was great", "boring plot"])
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    for row in rows:
        field = json.loads(json.dumps(row[top_logprobs.FIELD]))  # survives a jsonl round trip
        tokens, ids, lps = top_logprobs.unpack(field)
        assert field["unmapped"] == 0  # 4 + 6k bytes a token, base64: 4/3 of that (plus padding)
        assert top_logprobs.stored_bytes_per_token(field) == pytest.approx((4 + 6 * K) * 4 / 3, abs=4)
        prompt = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        with torch.inference_mode():  # the teacher's log-probabilities, recomputed directly
            logits = model(input_ids=torch.tensor([prompt + tokens.tolist()])).logits[0]
        direct = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)], -1)
        top_v, top_i = direct.topk(K, -1)
        assert (top_i.numpy() == ids).all()
        assert np.allclose(top_v.numpy(), lps, atol=2e-3)  # float16


def kd_loss_of_the_trainer(model, tok, features, alpha, temperature, tmp_path):
    """compeff's KD trainer (TRL's SFTTrainer underneath) asked for its loss on one batch of all features,
    and the mean KL per position with teacher information it logs."""
    from trl import SFTConfig

    from compeff.train.logit_kd import kd_trainer_class, row_index

    args = SFTConfig(output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True, bf16=False,
                     remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, packing=False)  # fmt: skip
    trainer = kd_trainer_class()(model=model, args=args, processing_class=tok, kd_alpha=alpha,
                                 kd_temperature=temperature, train_dataset=row_index(features),
                                 data_collator=collate(tok.pad_token_id, features))  # fmt: skip
    batch = collate(tok.pad_token_id)(features)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    return loss.item(), trainer._metrics["eval"]["kd_kl"][-1]


def test_kd_loss_in_the_trainer_equals_the_hand_computation(tiny_lm, tmp_path):
    rows = captured_samples(tiny_lm, ["the film was great", "boring plot", "music and actors"])
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    pairs = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows]
    features, refused, _ = kd_features(tok, rows, pairs, max_length=128)
    assert not refused and len(features) == 3
    batch = collate(tok.pad_token_id)(features)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
    loss, mean_kl = kd_loss_of_the_trainer(model, tok, features, 0.5, 2.0, tmp_path)
    # by hand, position by position: logits at t predict token t + 1
    logits = out.logits.numpy()
    terms = []
    for b in range(3):
        for t in range(1, logits.shape[1]):
            lp = batch["teacher_logprobs"][b, t].numpy()
            if not np.isfinite(lp).any():
                continue
            p = np.exp(lp / 2.0)
            p /= p.sum()
            q = np.exp(logits[b, t - 1] / 2.0 - np.logaddexp.reduce(logits[b, t - 1] / 2.0))
            terms.append(float((p * (np.log(p) - np.log(q[batch["teacher_ids"][b, t].numpy()]))).sum()))
    assert len(terms) == sum(len(top_logprobs.unpack(r[top_logprobs.FIELD])[0]) for r in rows)
    answer_tokens = int((batch["labels"] != -100).sum())  # the KL is divided as the CE is
    assert mean_kl == pytest.approx(np.mean(terms), rel=1e-4)
    assert loss == pytest.approx(out.loss.item() + 0.5 * 4.0 * np.sum(terms) / answer_tokens, rel=1e-4)
    # the teacher is this very model: on its top-k the renormalised teacher is the student restricted
    # there, so the sparse KL is -log(the student's mass on those k tokens)
    loss, _ = kd_loss_of_the_trainer(model, tok, features, 1.0, 1.0, tmp_path)
    masses = []
    for b in range(3):
        for t in range(1, logits.shape[1]):
            lp = batch["teacher_logprobs"][b, t].numpy()
            if np.isfinite(lp).any():
                masses.append(-math.log(np.exp(lp).sum()))
    assert loss - out.loss.item() == pytest.approx(np.sum(masses) / answer_tokens, abs=2e-3)


def test_kd_training_runs_and_refuses_what_does_not_line_up(tiny_lm, tmp_path):
    from compeff.train.sft import run_sft_stage

    rows = captured_samples(
        tiny_lm, ["the film was great", "boring plot", "music and actors", "sad and slow"]
    )
    bad = json.loads(json.dumps(rows[0]))
    bad["id"] = "changed"
    bad["messages"][1]["content"] = "something the teacher never said"  # its stored tokens no longer match
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, bad]))
    recipe = load_recipe(None, [f"run.dir={tmp_path}", "run.name=kd", f"student.model={tiny_lm}", f"sft.input={data}",
                                "sft.loss=kd", "sft.kd_alpha=0.5", "sft.kd_temperature=2.0", "sft.max_steps=2",
                                "sft.per_device_batch_size=2", "sft.logging_steps=1"])  # fmt: skip
    manifest = run_sft_stage(recipe, progress=False)
    assert manifest["kd_refused"] == {"answer tokens differ": 1} and manifest["steps"] == 2
    logged = [json.loads(line) for line in (tmp_path / "kd" / "sft" / "data.jsonl").open()]
    assert any("kd_kl" in r for r in logged)
    # another vocabulary: refused before any training, naming cross-tokenizer methods as out of scope
    other = json.loads(json.dumps(rows[1]))
    other[top_logprobs.FIELD]["vocab"] = "0123456789abcdef"
    data.write_text(json.dumps(other) + "\n")
    with pytest.raises(VocabularyMismatch, match="across tokenizers"):
        run_sft_stage(
            load_recipe(None, [*recipe_overrides(tmp_path, tiny_lm, data), "run.name=kd2"]), progress=False
        )


def recipe_overrides(tmp_path, model, data):
    return [
        f"run.dir={tmp_path}",
        f"student.model={model}",
        f"sft.input={data}",
        "sft.loss=kd",
        "sft.max_steps=1",
    ]


def test_gkd_trains_on_policy_with_a_local_teacher_and_refuses_another_vocabulary(tiny_lm, tmp_path):
    from compeff.train.sft import run_sft_stage

    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": f"g{i}", "messages": [{"role": "user", "content": t},
                                                                     {"role": "assistant", "content": "fun film"}]}) + "\n"
                            for i, t in enumerate(["the film was great", "boring plot", "sad music", "happy actors"])))  # fmt: skip
    base = [f"run.dir={tmp_path}", f"teacher.model={tiny_lm}", f"sft.input={data}", "sft.loss=gkd",
            "sft.gkd_max_new_tokens=4", "sft.max_steps=2", "sft.per_device_batch_size=2", "sft.logging_steps=1"]  # fmt: skip
    manifest = run_sft_stage(
        load_recipe(None, [*base, "run.name=gkd", f"student.model={tiny_lm}"]), progress=False
    )
    assert manifest["steps"] == 2 and manifest["loss"] == "gkd" and manifest["final_loss"] is not None
    other = tmp_path / "other-vocab"  # the same model with one more token: another vocabulary
    AutoModelForCausalLM.from_pretrained(tiny_lm).save_pretrained(other)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.add_tokens(["zzzunseen"])
    tok.save_pretrained(other)
    with pytest.raises(VocabularyMismatch, match="teacher's vocabulary"):
        run_sft_stage(load_recipe(None, [*base, "run.name=gkd2", f"student.model={other}"]), progress=False)
    wider = tmp_path / "wider-head"  # the same tokenizer, an output layer padded to a wider width
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    model.save_pretrained(wider)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(wider)
    with pytest.raises(VocabularyMismatch, match="vocab_size"):
        run_sft_stage(load_recipe(None, [*base, "run.name=gkd3", f"student.model={wider}"]), progress=False)


def test_packed_rows_keep_samples_apart_and_train(tiny_lm, tmp_path):
    """sft.packing with kd: each sample's logits in a packed row equal its logits alone (no attention
    across samples), the teacher's arrays stay at their tokens, and the trainer runs on packed rows."""
    from compeff.train.logit_kd import pack_features
    from compeff.train.sft import run_sft_stage

    rows = captured_samples(
        tiny_lm, ["the film was great", "boring plot", "music and actors", "sad and slow"]
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    pairs = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows]
    features, refused, _ = kd_features(tokenizer, rows, pairs, 256)
    assert not refused and len(features) == 4
    longest = max(len(f["input_ids"]) for f in features)
    packed = pack_features(features, 2 * longest + 1)
    assert (
        len(packed) == 2
        and sorted(len(p["input_ids"]) for p in packed)
        == sorted([sum(len(f["input_ids"]) for f in features[i : i + 2]) for i in (0, 2)])
        or sum(len(p["input_ids"]) for p in packed) == sum(len(f["input_ids"]) for f in features)
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, attn_implementation="sdpa").eval()
    batch = collate(tokenizer.pad_token_id)(packed)
    assert "attention_mask" not in batch
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "labels")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits  # no KV cache: the packed rows' own mask
        alone = {
            tuple(f["input_ids"]): model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in features
        }
    for row, p in enumerate(packed):
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            torch.testing.assert_close(
                logits[row, a:b], alone[tuple(p["input_ids"][a:b])], atol=1e-4, rtol=1e-4
            )
            original = next(f for f in features if f["input_ids"] == p["input_ids"][a:b])
            here = (p["teacher_pos"] >= a) & (p["teacher_pos"] < b)
            assert (p["teacher_pos"][here] - a).tolist() == original["teacher_pos"].tolist()
            assert (p["teacher_ids"][here] == original["teacher_ids"]).all()
            assert (p["teacher_logprobs"][here] == original["teacher_logprobs"]).all()
    # trained with packing: fewer, fuller rows than samples
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(None, [*recipe_overrides(tmp_path, tiny_lm, data), "run.name=packed", "sft.packing=true",
                                f"sft.max_length={2 * longest + 1}", "sft.per_device_batch_size=1",
                                "sft.max_steps=2", "sft.logging_steps=1"])  # fmt: skip
    manifest = run_sft_stage(recipe, progress=False)
    assert manifest["steps"] == 2 and manifest["final_loss"] is not None


def test_an_answer_the_tokenizer_would_split_otherwise_trains_on_the_teachers_tokens(tiny_lm):
    """A sampled segmentation the tokenizer would not produce (here one token per character) still lines
    up: the teacher's tokens are trained on, each with its own log-probabilities; an edited text does not."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    answer = "a great film"
    canonical = tokenizer(answer, add_special_tokens=False)["input_ids"]
    pieces = [ch for piece in tokenizer.convert_ids_to_tokens(canonical) for ch in piece]
    teacher = tokenizer.convert_tokens_to_ids(pieces)
    assert teacher != canonical and tokenizer.decode(teacher) == answer
    rng = np.random.default_rng(0)
    top = rng.integers(0, len(tokenizer), size=(len(teacher), K))
    lps = np.log(rng.dirichlet(np.ones(K), size=len(teacher)))
    field = {"k": K, "n": len(teacher), "vocab": top_logprobs.vocab_fingerprint(tokenizer),
             "tokens": top_logprobs._b64(np.array(teacher, dtype="<u4")), "ids": top_logprobs._b64(top.astype("<u4")),
             "logprobs": top_logprobs._b64(lps.astype("<f2")), "unmapped": 0}  # fmt: skip
    messages = [{"role": "user", "content": "how was it?"}, {"role": "assistant", "content": answer}]
    row = {"id": "s", "messages": messages, top_logprobs.FIELD: field}
    pair = {"prompt": messages[:1], "completion": messages[1:]}
    features, refused, resegmented = kd_features(tokenizer, [row], [pair], 256)
    assert not refused and resegmented == 1
    start = features[0]["completion_mask"].index(1)
    assert features[0]["input_ids"][start : start + len(teacher)] == teacher
    assert features[0]["teacher_pos"][3] == start + 3
    assert features[0]["teacher_ids"][3].tolist() == top[3].tolist()
    assert tokenizer.decode(features[0]["input_ids"]) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    edited = json.loads(json.dumps(row))
    edited["messages"][1]["content"] = "a grim film"
    _, refused, _ = kd_features(
        tokenizer, [edited], [{"prompt": messages[:1], "completion": edited["messages"][1:]}], 256
    )
    assert refused == {"answer tokens differ": ["s"]}


def test_ids_beyond_the_students_vocabulary_are_refused_before_training(tiny_lm):
    """A server named ids the student's tokenizer does not have (a top-k id == len(tokenizer), or a
    sampled one): the sample is refused with its reason, instead of a gather failing mid-training."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    answer = "a great film"
    tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "how was it?"}, {"role": "assistant", "content": answer}]
    pair = {"prompt": messages[:1], "completion": messages[1:]}

    def row(name, sampled, top):
        lps = np.log(np.full(top.shape, 1.0 / K))
        field = top_logprobs.pack_arrays(
            np.array(sampled), top, lps, top_logprobs.vocab_fingerprint(tokenizer)
        )
        return {"id": name, "messages": messages, top_logprobs.FIELD: field}

    top = np.tile(np.arange(K), (len(tokens), 1))
    wide = top.copy()
    wide[1, 2] = len(tokenizer)  # one past the last id
    rows = [
        row("ok", tokens, top),
        row("wide", tokens, wide),
        row("sampled", [*tokens[:-1], len(tokenizer)], top),
    ]
    features, refused, _ = kd_features(tokenizer, rows, [pair] * 3, 256)
    assert len(features) == 1 and features[0]["teacher_ids"].max() < len(tokenizer)
    assert refused == {"token ids beyond the student's vocabulary": ["wide", "sampled"]}


def test_kd_with_packing_and_lora_under_torchrun(tiny_lm, tmp_path):
    """As plain SFT: two ranks (torchrun, gloo on CPU) train kd with packed rows and a LoRA adapter; only
    rank 0 writes the stage, which records the world size and the samples trained on."""
    import subprocess
    import sys

    rows = captured_samples(tiny_lm, ["the film was great", "boring plot", "music and actors", "sad and slow",
                                      "a fine cast", "dull"])  # fmt: skip
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [f"run.dir={tmp_path}", "run.name=ddp", f"student.model={tiny_lm}", f"sft.input={data}", "sft.loss=kd",
            "sft.packing=true", "sft.max_length=120", "sft.lora_r=4", "sft.max_steps=2",
            "sft.per_device_batch_size=1", "sft.logging_steps=1"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "compeff.cli", "sft", *[x for s in sets for x in ("--set", s)]]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "ddp" / "sft" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["kd_samples"] == 6 and manifest["steps"] == 2
    assert (tmp_path / "ddp" / "sft" / "model" / "adapter_model.safetensors").exists()
