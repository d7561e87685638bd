"""The teacher's top-k log-probabilities of every answer token, packed compactly inside the sample's record.

``generate.teacher_top_logprobs: k`` keeps, per answer token, the sampled token id and the teacher's k
most likely token ids with their log-probabilities. They travel inside the record (field
``teacher_top_logprobs``) so every mechanism that carries records carries them too: resume after a kill,
shards and ``--merge``, ``score`` and ``sample``'s retained subset. The arrays are little-endian
``uint32`` ids and ``float16`` log-probabilities, base64-encoded: ``6k`` bytes a token before base64
(``8k`` after), 160 bytes a token for k = 20. ``vocab`` is a fingerprint of the tokenizer whose ids these
are; ``sft.loss: kd`` refuses a student whose vocabulary differs.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

FIELD = "teacher_top_logprobs"


def vocab_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (token string -> id), the same for equal vocabularies
    whatever the model is called."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in items).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


def token_id_lookup(tokenizer: Any) -> Callable[[dict[str, Any]], int | None]:
    """The id of a logprob entry: its ``id`` when the backend gives one (hf), else its token text looked
    up among the vocabulary's strings and their decoded forms (servers return decoded text)."""
    vocab = tokenizer.get_vocab()
    decoded: dict[str, int] = {}
    for token_id in sorted(vocab.values()):
        decoded.setdefault(tokenizer.decode([token_id]), token_id)

    def lookup(entry: dict[str, Any]) -> int | None:
        if entry.get("id") is not None:
            return int(entry["id"])
        token = entry.get("token", "")
        if token in vocab:
            return int(vocab[token])
        return decoded.get(token)

    return lookup


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


def pack(
    content: list[dict[str, Any]], k: int, lookup: Callable[[dict[str, Any]], int | None], vocab: str
) -> dict[str, Any]:
    """One answer's per-token entries (OpenAI layout: token, logprob, top_logprobs) -> the packed field.
    Alternatives whose id cannot be found are left out (-inf) and counted in ``unmapped``."""
    n = len(content)
    tokens = np.zeros(n, dtype="<u4")
    ids = np.zeros((n, k), dtype="<u4")
    logprobs = np.full((n, k), -np.inf, dtype="<f2")
    unmapped = 0
    for t, entry in enumerate(content):
        chosen = lookup(entry)
        if chosen is None:
            unmapped += 1
        tokens[t] = chosen if chosen is not None else 0
        for j, alt in enumerate((entry.get("top_logprobs") or [])[:k]):
            alt_id = lookup(alt)
            if alt_id is None:
                unmapped += 1
                continue
            ids[t, j] = alt_id
            logprobs[t, j] = alt.get("logprob", -np.inf)
    return {"k": k, "n": n, "vocab": vocab, "tokens": _b64(tokens), "ids": _b64(ids),
            "logprobs": _b64(logprobs), "unmapped": unmapped}  # fmt: skip


def unpack(field: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sampled token ids [n], top-k ids [n, k], top-k log-probabilities [n, k] as float32; -inf where
    an alternative is missing)."""
    n, k = int(field["n"]), int(field["k"])
    tokens = np.frombuffer(base64.b64decode(field["tokens"]), dtype="<u4").astype(np.int64)
    ids = np.frombuffer(base64.b64decode(field["ids"]), dtype="<u4").astype(np.int64).reshape(n, k)
    logprobs = (
        np.frombuffer(base64.b64decode(field["logprobs"]), dtype="<f2").astype(np.float32).reshape(n, k)
    )
    if tokens.shape != (n,):
        raise ValueError(f"{FIELD}: {tokens.shape[0]} sampled tokens, expected {n}")
    return tokens, ids, logprobs


def stored_bytes_per_token(field: dict[str, Any]) -> float:
    """Bytes the packed arrays take per answer token, as stored (base64 text)."""
    n = max(int(field["n"]), 1)
    return (len(field["tokens"]) + len(field["ids"]) + len(field["logprobs"])) / n
