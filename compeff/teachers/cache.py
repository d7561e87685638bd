"""SQLite cache of teacher requests -> answers, shared safely by threads and processes (WAL mode)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from compeff.teachers.base import ChatRequest, TeacherResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    value TEXT NOT NULL,
    created REAL NOT NULL DEFAULT (julianday('now'))
)
"""


def _dumps(value: dict) -> str:
    try:
        import orjson
    except ImportError:  # pragma: no cover
        return json.dumps(value, ensure_ascii=False)
    return orjson.dumps(value).decode("utf-8")


def request_key(model: str, request: ChatRequest) -> str:
    """Cache key: sha256 over model, messages and sampling parameters (not the caller's id)."""
    payload = {"model": model, "messages": request.messages, "params": request.params.to_dict()}
    try:
        import orjson

        blob = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    except ImportError:  # pragma: no cover
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


class TeacherCache:
    """Answers identical requests without calling the teacher. Only successful answers are kept."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=60000")
        self._conn.execute(_SCHEMA)
        self.hits = 0
        self.misses = 0

    def get(self, model: str, request: ChatRequest) -> TeacherResult | None:
        """The cached answer to an identical request, re-labelled with this request's id, or None."""
        hits, _ = self.get_many(model, [request])
        return hits.get(request.id)

    def get_many(
        self, model: str, requests: list[ChatRequest]
    ) -> tuple[dict[str, TeacherResult], dict[str, str]]:
        """Cached answers by request id, and every request's key (for put_many), in chunked look-ups."""
        keys = {r.id: request_key(model, r) for r in requests}
        by_key: dict[str, str] = {}
        unique = list(set(keys.values()))
        with self._lock:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                by_key.update(
                    self._conn.execute(
                        f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk
                    ).fetchall()
                )
        hits = {}
        for request in requests:
            raw = by_key.get(keys[request.id])
            if raw is None:
                continue
            value = json.loads(raw)
            hits[request.id] = TeacherResult(
                id=request.id,
                ok=True,
                texts=value["texts"],
                logprobs=value.get("logprobs"),
                usage=value.get("usage", {}),
                finish_reasons=value.get("finish_reasons", []),
                cached=True,
                attempts=0,
                meta=request.meta,
            )
        self.hits += len(hits)
        self.misses += len(requests) - len(hits)
        return hits, keys

    def put(self, model: str, request: ChatRequest, result: TeacherResult) -> None:
        """Store a successful answer (first writer wins; concurrent writers are safe)."""
        self.put_many(model, [(request, result)])

    def put_many(
        self, model: str, pairs: list[tuple[ChatRequest, TeacherResult]], keys: dict[str, str] | None = None
    ) -> None:
        """Store many successful answers in one transaction (``keys`` by request id, if known)."""
        rows = [
            (
                keys[request.id] if keys and request.id in keys else request_key(model, request),
                model,
                _dumps(
                    {
                        "texts": result.texts,
                        "logprobs": result.logprobs,
                        "usage": result.usage,
                        "finish_reasons": result.finish_reasons,
                    }
                ),
            )
            for request, result in pairs
            if result.ok
        ]
        if not rows:
            return
        # one multi-row statement per chunk: executemany would release and re-take the GIL per row,
        # which stalls behind the event loop thread of the openai backend
        with self._lock:
            self._conn.execute("BEGIN")
            for start in range(0, len(rows), 256):
                chunk = rows[start : start + 256]
                marks = ",".join(["(?, ?, ?)"] * len(chunk))
                flat = [v for row in chunk for v in row]
                self._conn.execute(f"INSERT OR IGNORE INTO answers (key, model, value) VALUES {marks}", flat)
            self._conn.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
