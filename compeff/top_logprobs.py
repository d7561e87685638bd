"""The teacher's top-k log-probabilities of every answer token, packed compactly inside the sample's record.

``generate.teacher_top_logprobs: k`` keeps, per answer token, the sampled token id and the teacher's k
most likely token ids with their log-probabilities. They travel inside the record (field
``teacher_top_logprobs``) so every mechanism that carries records carries them too: resume after a kill,
shards and ``--merge``, ``score`` and ``sample``'s retained subset. The arrays are little-endian
``uint32`` ids and ``float16`` log-probabilities, base64-encoded: ``6k`` bytes a token before base64
(``8k`` after), 160 bytes a token for k = 20. ``vocab`` is a fingerprint of the tokenizer whose ids these
are; ``sft.loss: kd`` refuses a student whose vocabulary differs. A served teacher's vocabulary cannot be
read whole: its fingerprint (``probe:...``) hashes the ids its tokenizer gives a fixed set of texts, asked
of the server, and the student is compared by the same probe.

When a stage whose records carry the field completes, :func:`write_parquet` also leaves a columnar copy
beside ``data.jsonl``: ``top_logprobs.parquet``, one row per sample id with ``tokens`` (``list<uint32>``),
``top_ids`` (``list<list<uint32>>``) and ``top_logprobs`` (``list<list<float16>>``), which pyarrow, pandas
and ``datasets.load_dataset("parquet", ...)`` read as arrays. The records stay the source of truth (they
are what survives a kill); the parquet file is rewritten whole at every completion.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from compeff.data import DataError

FIELD = "teacher_top_logprobs"
PROBE = "probe:"  # the prefix of a fingerprint taken by probing a tokenizer (a served one)
TOKEN_ID = "token_id:"  # vLLM's spelling of a token named by id (``return_tokens_as_token_ids``)

# Texts whose token ids tell tokenizer families apart: words with and without a leading space, capitals,
# digits, punctuation, whitespace runs, accents, CJK, emoji and code. Changing them changes every
# served fingerprint (samples generated before then are refused by sft.loss: kd).
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    " leading space, then  two spaces and a tab\tend",
    "Numbers: 0 7 42 1999 3.14159 1,000,000 and 2024-06-01.",
    "I LOVED it!!! Would watch again :) #bestfilmever @friend",
    "Accents: café, naïve, Zürich, São Paulo, Ελληνικά, русский.",
    "中文字符和日本語のテキスト、한국어 문장.",
    "Emoji 🙂👍🏽 and symbols © ™ € → ≥",
    "def f(x):\n    return x ** 2  # square\n\n",
    "negative neutral positive Negative Neutral Positive",
)


class VocabularyMismatch(DataError):
    """The student's tokenizer is not the one the teacher's token ids belong to."""


def vocab_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (token string -> id), the same for equal vocabularies
    whatever the model is called."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in items).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


def probe_fingerprint(tokenize: Callable[[str], list[int]]) -> str:
    """``probe:`` and a short hash of the token ids ``tokenize`` gives :data:`PROBE_TEXTS` (no special
    tokens): how a tokenizer known only by its tokenize function (a server's) is compared with another."""
    lines = [",".join(str(int(i)) for i in tokenize(text)) for text in PROBE_TEXTS]
    return PROBE + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def tokenizer_probe_fingerprint(tokenizer: Any) -> str:
    """The :func:`probe_fingerprint` of a local (transformers) tokenizer."""
    return probe_fingerprint(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])


def fingerprint_like(tokenizer: Any, fingerprint: str) -> str:
    """A local tokenizer's fingerprint of the same kind as ``fingerprint`` (probe or whole vocabulary)."""
    if fingerprint.startswith(PROBE):
        return tokenizer_probe_fingerprint(tokenizer)
    return vocab_fingerprint(tokenizer)


def entry_id(entry: dict[str, Any]) -> int | None:
    """The token id a logprob entry names itself: its ``id`` (hf, vllm, llama.cpp's server) or a token
    spelt ``token_id:N`` (vLLM's server asked with ``return_tokens_as_token_ids``); else None."""
    if entry.get("id") is not None:
        return int(entry["id"])
    token = entry.get("token")
    if isinstance(token, str) and token.startswith(TOKEN_ID) and token[len(TOKEN_ID) :].isdigit():
        return int(token[len(TOKEN_ID) :])
    return None


def token_id_lookup(tokenizer: Any) -> Callable[[dict[str, Any]], int | None]:
    """The id of a logprob entry: the id it carries (:func:`entry_id`), else its token text looked up
    among the vocabulary's strings and their decoded forms (servers that return decoded text only). A
    decoded form that several ids share (partial UTF-8 pieces all decode to U+FFFD) names none of them:
    the entry stays unmapped rather than credited to an arbitrary token."""
    vocab = tokenizer.get_vocab()
    decoded: dict[str, int | None] = {}
    for token_id in sorted(vocab.values()):
        text = tokenizer.decode([token_id])
        decoded[text] = None if text in decoded else token_id

    def lookup(entry: dict[str, Any]) -> int | None:
        named = entry_id(entry)
        if named is not None:
            return named
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


def pack_arrays(tokens: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, vocab: str) -> dict[str, Any]:
    """The packed field of arrays already in token ids: sampled tokens [n], top-k ids and log-probabilities
    [n, k] (stored as uint32 and float16, as :func:`pack` stores them)."""
    n, k = ids.shape
    return {"k": k, "n": n, "vocab": vocab, "tokens": _b64(np.asarray(tokens, dtype="<u4")),
            "ids": _b64(np.asarray(ids, dtype="<u4")), "logprobs": _b64(np.asarray(logprobs, dtype="<f2")),
            "unmapped": 0}  # fmt: skip


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


PARQUET_FILE = "top_logprobs.parquet"
_ROWS_PER_GROUP = 512


def _arrow_batch(rows: list[tuple[str, dict[str, Any]]]) -> Any:
    """One Arrow record batch from (sample id, packed field) pairs; nested lists built from flat numpy
    arrays and offsets, with no per-token Python objects."""
    import pyarrow as pa

    unpacked = [unpack(field) for _, field in rows]
    lengths = np.array([len(t) for t, _, _ in unpacked], dtype=np.int64)
    outer = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    widths = np.repeat([ids.shape[1] for _, ids, _ in unpacked], lengths)
    inner = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    tokens = np.concatenate([t for t, _, _ in unpacked]).astype(np.uint32)
    flat_ids = np.concatenate([ids.reshape(-1) for _, ids, _ in unpacked]).astype(np.uint32)
    flat_lp = np.concatenate([lp.reshape(-1) for _, _, lp in unpacked]).astype(np.float16)

    def nested(values: np.ndarray) -> Any:
        per_token = pa.ListArray.from_arrays(pa.array(inner), pa.array(values))
        return pa.ListArray.from_arrays(pa.array(outer), per_token)

    return pa.record_batch(
        {
            "id": pa.array([sample_id for sample_id, _ in rows], pa.string()),
            "vocab": pa.array([str(field["vocab"]) for _, field in rows], pa.string()),
            "k": pa.array([int(field["k"]) for _, field in rows], pa.int16()),
            "tokens": pa.ListArray.from_arrays(pa.array(outer), pa.array(tokens)),
            "top_ids": nested(flat_ids),
            "top_logprobs": nested(flat_lp),
        }
    )


def write_parquet(records: Iterable[dict[str, Any]], path: Path) -> dict[str, Any] | None:
    """Write the field of every record that has one to ``path`` (via a temporary file, renamed when
    whole); returns rows, answer tokens and bytes per token, or None (and no file) when no record has it."""
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    writer, pending, n_rows, n_tokens, stored = None, [], 0, 0, 0

    def flush() -> None:
        nonlocal writer
        batch = _arrow_batch(pending)
        writer = writer or pq.ParquetWriter(tmp, batch.schema, compression="zstd")
        writer.write_batch(batch)
        pending.clear()

    try:
        for record in records:
            field = record.get(FIELD)
            if not field:
                continue
            pending.append((str(record["id"]), field))
            n_rows, n_tokens = n_rows + 1, n_tokens + int(field["n"])
            stored += stored_bytes_per_token(field) * max(int(field["n"]), 1)
            if len(pending) == _ROWS_PER_GROUP:
                flush()
        if pending:
            flush()
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        path.unlink(missing_ok=True)
        return None
    tmp.replace(path)
    return {
        "file": path.name,
        "rows": n_rows,
        "tokens": n_tokens,
        "parquet_bytes_per_token": round(path.stat().st_size / max(n_tokens, 1), 1),
        "jsonl_bytes_per_token": round(stored / max(n_tokens, 1), 1),
    }
