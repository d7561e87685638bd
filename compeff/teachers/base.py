"""The one Teacher interface: chat requests in, one result per request out, nothing dropped."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any


# ----------------------------------------------------------------------------------- exceptions
class TeacherError(Exception):
    """Base of every teacher failure; ``kind`` is a short machine-readable label."""

    kind = "error"
    retryable = False


class TeacherTimeout(TeacherError):
    """The request did not finish before its deadline."""

    kind = "timeout"
    retryable = True


class TeacherConnectionError(TeacherError):
    """The server could not be reached or dropped the connection."""

    kind = "connection"
    retryable = True


class TeacherStatusError(TeacherError):
    """The server answered with an HTTP error status."""

    kind = "status"

    def __init__(self, status: int, body: str = "", retry_after: float | None = None):
        # llama-cpp-python answers a request it cannot validate with 500 and pydantic's message: the same
        # request fails the same way every time, so it is not retried
        invalid = "validation error" in body and "'body'" in body
        hint = ""
        if "response_format" in body:
            hint = " (the server does not take this response_format: see teacher.response_format)"
        super().__init__(f"HTTP {status}: {body[:300]}{hint}")
        self.status = status
        self.retry_after = retry_after
        self.retryable = (status == 429 or status >= 500 or status == 408) and not invalid


class TeacherProtocolError(TeacherError):
    """The server's body was not a valid chat-completions answer (malformed JSON, missing fields)."""

    kind = "protocol"
    retryable = True


class TeacherUnavailable(TeacherError):
    """A backend cannot be used here (library missing, model not loadable)."""

    kind = "unavailable"


# ------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings that are part of a request (and of its cache key)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: JSON schema (canonical JSON text) the answer must follow: decoding is constrained to it
    json_schema: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(_params_dict(self))  # a copy: every request reads the one cached dict


@lru_cache(maxsize=256)
def _params_dict(params: SamplingParams) -> dict[str, Any]:
    # many requests share one params object; asdict() deep-copies, so compute each once
    return {f.name: getattr(params, f.name) for f in fields(params)}


def _seed_of(text: str) -> int:
    """A stable non-negative 31-bit seed from a string (the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def request_seed(run_seed: int, request_id: str) -> int:
    """The sampling seed of one request: a stable hash of the run seed and the request's id, so a rerun
    draws the same answer and two requests with the same prompt draw independent ones."""
    return _seed_of(f"{run_seed}:{request_id}")


def hash_seeds(seeds: list[int]) -> int:
    """One seed for a batch of seeded requests (the hf backend draws a batch with one generator)."""
    return _seed_of(",".join(map(str, seeds)))


@dataclass
class ChatRequest:
    """One chat-completions request with a caller-chosen stable id."""

    id: str
    messages: list[dict[str, str]]
    params: SamplingParams = field(default_factory=SamplingParams)
    meta: dict[str, Any] = field(default_factory=dict)
    #: ask a server to name the log-probabilities' tokens by id (vLLM: ``return_tokens_as_token_ids``);
    #: set only for a server known to accept it. Not part of the cache key: both forms read alike.
    logprob_token_ids: bool = False


@dataclass
class TeacherResult:
    """The outcome of one request: ok with texts, or failed with a reason. Always one per request."""

    id: str
    ok: bool
    texts: list[str] = field(default_factory=list)
    logprobs: list[Any] | None = None
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    attempts: int = 1
    cached: bool = False
    latency_s: float = 0.0
    finish_reasons: list[str | None] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The first answer's text ('' if none)."""
        return self.texts[0] if self.texts else ""

    @property
    def cacheable(self) -> bool:
        """Worth keeping for identical requests: ok, every answer non-empty text, none cut at max_tokens."""
        return (
            self.ok
            and bool(self.texts)
            and all(isinstance(t, str) and t.strip() for t in self.texts)
            and "length" not in self.finish_reasons
        )

    def failure_record(self) -> dict[str, Any]:
        """The line this result contributes to ``failures.jsonl``."""
        return {
            "id": self.id,
            "reason": self.error,
            "kind": self.error_kind,
            "attempts": self.attempts,
            **self.meta,
        }


@dataclass
class Usage:
    """Running totals of a teacher's work, for manifests and reports."""

    requests: int = 0
    ok: int = 0
    failed: int = 0
    cached: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, result: TeacherResult) -> None:
        self.requests += 1
        self.ok += result.ok
        self.failed += not result.ok
        self.cached += result.cached
        self.retries += max(0, result.attempts - 1)
        if not result.cached:
            self.prompt_tokens += int(result.usage.get("prompt_tokens", 0))
            self.completion_tokens += int(result.usage.get("completion_tokens", 0))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Teacher(abc.ABC):
    """A model that answers chat requests. Backends differ in transport, never in this contract:
    ``generate`` yields exactly one :class:`TeacherResult` per request (in completion order)."""

    model: str
    #: the run seed; when set, every sampled request (temperature > 0) without a seed gets its own
    seed: int | None = None

    def __init__(self) -> None:
        self.usage = Usage()

    @property
    def cache_identity(self) -> str:
        """What the cache keys answers by: the model name; local backends add their weights' fingerprint."""
        return self.model

    def executor_info(self) -> dict[str, Any]:
        """Where this teacher's work runs, for a stage's manifest (Ray backends say more)."""
        return {"kind": "local"}

    def seeded(self, request: ChatRequest) -> ChatRequest:
        """The request with its own sampling seed (see :func:`request_seed`) when it samples and has none."""
        if self.seed is not None and request.params.temperature > 0 and request.params.seed is None:
            request.params = dataclasses.replace(request.params, seed=request_seed(self.seed, request.id))
        return request

    def forget(self, requests: list[ChatRequest], cache: Any) -> None:
        """Drop these requests' answers from ``cache`` (a stage rejected them: the retry asks again)."""
        if cache is not None and requests:
            cache.forget_many(self.cache_identity, requests)

    @abc.abstractmethod
    def _generate(self, requests: list[ChatRequest]) -> Iterator[TeacherResult]:
        """Backend work: answer every request (order free), failures as failed results."""

    #: backends that read their requests lazily (so building them overlaps with answering them)
    streams_requests = False
    #: results per durable write of a stage: a batched backend sets its batch size, so a kill loses at
    #: most the batch in flight; None lets the stage group streamed answers (at most a second's worth)
    flush_every: int | None = None

    def generate(self, requests: Iterable[ChatRequest], cache: Any = None) -> Iterator[TeacherResult]:
        """Answer requests, serving identical ones from ``cache`` (a TeacherCache) when given.

        ``requests`` may be a lazy iterator: streaming backends pull from it while earlier requests are
        in flight, and cache look-ups then happen chunk by chunk on the way in.
        """
        by_id: dict[str, ChatRequest] = {}
        keys: dict[str, str] = {}
        hits: deque[TeacherResult] = deque()

        def feed() -> Iterator[ChatRequest]:
            """Requests for the backend: cached ones are set aside, the rest registered and passed on."""
            chunk: list[ChatRequest] = []
            for request in itertools.chain(requests, [None]):
                if request is not None:
                    chunk.append(self.seeded(request))
                    if len(chunk) < 256 and cache is not None:
                        continue
                    if cache is None:
                        by_id[request.id] = request
                        yield request
                        chunk.clear()
                        continue
                if not chunk:
                    continue
                found, chunk_keys = cache.get_many(self.cache_identity, chunk)
                keys.update(chunk_keys)
                for item in chunk:
                    if item.id in found:
                        hits.append(found[item.id])
                    else:
                        by_id[item.id] = item
                        yield item
                chunk = []

        source: Iterable[ChatRequest] = feed() if self.streams_requests else list(feed())
        seen: set[str] = set()
        to_cache: list[tuple[ChatRequest, TeacherResult]] = []

        def drain_hits() -> Iterator[TeacherResult]:
            while hits:
                hit = hits.popleft()
                self.usage.add(hit)
                yield hit

        yield from drain_hits()
        try:
            for result in self._generate(source):
                yield from drain_hits()
                if result.id in seen:
                    continue
                seen.add(result.id)
                if cache is not None and result.cacheable:
                    to_cache.append((by_id[result.id], result))
                    if len(to_cache) >= 256:  # one transaction per burst, not per answer
                        cache.put_many(self.cache_identity, to_cache, keys)
                        to_cache.clear()
                self.usage.add(result)
                yield result
        finally:
            if cache is not None and to_cache:
                cache.put_many(self.cache_identity, to_cache, keys)
        yield from drain_hits()
        for request in list(by_id.values()):  # a backend bug must not lose requests silently
            if request.id not in seen:
                lost = TeacherResult(
                    id=request.id, ok=False, error="backend returned no result", error_kind="lost"
                )
                self.usage.add(lost)
                yield lost

    def close(self) -> None:
        """Release connections, threads or GPU memory."""

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
