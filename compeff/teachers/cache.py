"""SQLite cache of teacher requests -> answers, safe for threads and processes (WAL mode)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compeff.data import DataError
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


class CacheError(DataError):
    """The cache file cannot be used (not a SQLite database, damaged, or a write failed)."""


class TeacherCache:
    """Answers identical requests without calling the teacher. Only successful answers are kept."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # several processes opening a new cache at once: switching it to WAL can answer "locked" at once,
        # without waiting in the busy handler, so the opening is tried again for up to a minute
        deadline = time.monotonic() + 60.0
        while True:
            conn = None
            try:
                conn = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA busy_timeout=60000")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(_SCHEMA)
                conn.execute("SELECT key, value FROM answers LIMIT 1").fetchall()
                self._conn = conn
                break
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                if "locked" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise CacheError(
                    f"teacher.cache {self.path}: not a usable SQLite cache ({exc}); move it away or set teacher.cache"
                ) from None
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
                try:
                    rows = self._conn.execute(
                        f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk
                    ).fetchall()
                except sqlite3.Error as exc:
                    raise CacheError(f"teacher.cache {self.path}: unreadable ({exc}); move it away") from None
                by_key.update(rows)
        hits = {}
        for request in requests:
            raw = by_key.get(keys[request.id])
            if raw is None:
                continue
            try:
                value = json.loads(raw)
                texts = value["texts"]
            except (ValueError, TypeError, KeyError):
                continue  # a damaged entry is a miss: the teacher answers again and the entry is replaced
            if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
                continue
            hits[request.id] = TeacherResult(
                id=request.id,
                ok=True,
                texts=texts,
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
        """Store a cacheable answer (the latest writer wins; concurrent writers are safe)."""
        self.put_many(model, [(request, result)])

    def put_many(
        self, model: str, pairs: list[tuple[ChatRequest, TeacherResult]], keys: dict[str, str] | None = None
    ) -> None:
        """Store many answers in one transaction (``keys`` by request id, if known); only cacheable ones
        (ok, non-empty text, not cut at max_tokens) are kept."""
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
            if result.cacheable
        ]
        if not rows:
            return
        # one multi-row statement per chunk: executemany would release and re-take the GIL per row,
        # which stalls behind the event loop thread of the openai backend
        with self._lock, self._transaction():
            for start in range(0, len(rows), 256):
                chunk = rows[start : start + 256]
                marks = ",".join(["(?, ?, ?)"] * len(chunk))
                flat = [v for row in chunk for v in row]
                self._conn.execute(f"INSERT OR REPLACE INTO answers (key, model, value) VALUES {marks}", flat)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT, rolled back on any error so the connection never stays inside a transaction."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            yield
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.rollback()
            raise CacheError(f"{self.path}: {exc}") from None
        except BaseException:
            if self._conn.in_transaction:
                self._conn.rollback()
            raise

    def forget_many(self, model: str, requests: list[ChatRequest]) -> None:
        """Remove the answers to these requests (a stage rejected them, so a retry must ask the teacher)."""
        keys = [request_key(model, r) for r in requests]
        with self._lock, self._transaction():
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                self._conn.execute(f"DELETE FROM answers WHERE key IN ({','.join('?' * len(chunk))})", chunk)

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
