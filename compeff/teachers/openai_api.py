"""Backend for any OpenAI-compatible chat-completions server (vLLM's ``vllm serve`` is the reference).

Many requests stay in flight (asyncio, ``concurrency`` workers), each with a deadline; 429s, 5xx,
timeouts, dropped connections and malformed bodies are retried with exponential backoff (honouring
``Retry-After``), each attempt going to the next base URL (round-robin over replicas). Requests to a
server compeff runs itself keep retrying refused connections and timeouts past ``max_retries`` for as
long as its restart may take (:func:`~compeff.teachers.endpoints.restart_window_s`), so a restart loses
no item. Transport is aiohttp: on this project's benchmark httpx's pool fell to ~150 requests/s at 256
in flight while aiohttp sustained several thousand (see README, Results).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import random
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from compeff.teachers.base import (
    ChatRequest,
    Teacher,
    TeacherConnectionError,
    TeacherError,
    TeacherProtocolError,
    TeacherResult,
    TeacherStatusError,
    TeacherTimeout,
)
from compeff.teachers.endpoints import restart_window_s

if TYPE_CHECKING:  # aiohttp is imported where a session is made: a parent that hands its requests
    import aiohttp  # to the client process never needs it (and saves ~0.2 s of start-up)

_DONE = object()
_JSON_HEADERS = {"Content-Type": "application/json"}
SWITCH_INTERVAL_S = 0.0005
OUTAGE_MIN_DELAY_S = 0.1  # retries while a server restarts are at least this far apart


try:  # orjson parses and writes the bodies several times faster than json
    import orjson

    _loads = orjson.loads
    _JSONDecodeError: tuple = (orjson.JSONDecodeError, json.JSONDecodeError)

    _dumps_bytes = orjson.dumps

except ImportError:  # pragma: no cover
    _loads = json.loads
    _JSONDecodeError = (json.JSONDecodeError,)

    def _dumps_bytes(value: Any) -> bytes:
        return json.dumps(value).encode("utf-8")


def run_loop(coro: Any) -> Any:
    """Run a coroutine on a fresh event loop: uvloop where installed (about 30% more requests/s)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def response_format(schema_text: str, style: str) -> dict[str, Any]:
    """The ``response_format`` that asks a server to follow a JSON schema: OpenAI's and vLLM's form
    (``json_schema``) or llama.cpp's (``json_object`` with the schema beside it)."""
    schema = json.loads(schema_text)
    if style == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def _request_body(model: str, request: ChatRequest, style: str = "json_schema") -> dict[str, Any]:
    p = request.params
    body: dict[str, Any] = {
        "model": model,
        "messages": request.messages,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_tokens": p.max_tokens,
        "n": p.n,
    }
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if p.logprobs:
        body["logprobs"] = True
        if p.top_logprobs:
            body["top_logprobs"] = p.top_logprobs
        if request.logprob_token_ids:  # tokens come back as "token_id:N": no text to look up
            body["return_tokens_as_token_ids"] = True
    if p.json_schema:
        body["response_format"] = response_format(p.json_schema, style)
    return body


MAX_BODY_BYTES = 64 << 20  # a chat completion far larger than any answer: a broken or hostile server


async def _read_capped(resp: Any, url: str) -> bytes:
    """A response body of at most MAX_BODY_BYTES; a longer one is a protocol error, not a memory spike."""
    if resp.content_length is not None and resp.content_length > MAX_BODY_BYTES:
        raise TeacherProtocolError(f"body of {resp.content_length} bytes from {url} exceeds {MAX_BODY_BYTES}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TeacherProtocolError(f"body from {url} exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_completion(raw: bytes) -> tuple[list[str], list[str | None], list[Any] | None, dict[str, int]]:
    """Texts, finish reasons, logprobs and usage of a chat-completions body; TeacherProtocolError if malformed."""
    try:
        data = _loads(raw)
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        texts = [c["message"].get("content") for c in choices]
    except (*_JSONDecodeError, UnicodeDecodeError) as exc:
        raise TeacherProtocolError(f"malformed JSON body: {exc}: {raw[:200]!r}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise TeacherProtocolError(f"body is not a chat completion (missing {exc}): {raw[:200]!r}") from None
    if not choices:
        raise TeacherProtocolError("answer has no choices")
    for text in texts:
        if not isinstance(text, str):
            shown = "null" if text is None else type(text).__name__
            raise TeacherProtocolError(f"answer content is {shown}, not text: {raw[:200]!r}")
    reasons = [c.get("finish_reason") for c in choices]
    logprobs = [c.get("logprobs") for c in choices] if any(c.get("logprobs") for c in choices) else None
    usage = {k: int(v) for k, v in (data.get("usage") or {}).items() if isinstance(v, int)}
    return texts, reasons, logprobs, usage


class OpenAITeacher(Teacher):
    """Teacher served over the OpenAI chat-completions protocol by one or more base URLs."""

    def __init__(
        self,
        model: str,
        base_urls: list[str] | str = "http://127.0.0.1:8000/v1",
        api_key: str | None = None,
        concurrency: int = 64,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        extra_body: dict[str, Any] | None = None,
        client_process: bool = True,
        response_format: str = "json_schema",
        outage_s: float | None = None,
    ):
        super().__init__()
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("base_urls: at least one URL is needed")
        self.model = model
        self.endpoints = [u.rstrip("/") + "/chat/completions" for u in urls]
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.extra_body = extra_body or {}
        self.response_format = response_format
        # how long a request keeps retrying while nothing answers (refused connections, timeouts) beyond
        # max_retries: a server compeff runs may be restarting for minutes (None: ask the registry)
        self.outage_s = restart_window_s(urls) if outage_s is None else max(0.0, float(outage_s))
        self._next_endpoint = itertools.count()
        self.client_process = client_process and os.name == "posix"
        self._client: Any = None  # the ClientProcess: started now, so it is ready by the first request
        if self.client_process:
            self._client = self._new_client()
            self._client.start()

    # ------------------------------------------------------------------ one request
    async def _attempt(self, session: aiohttp.ClientSession, url: str, body: bytes) -> TeacherResult:
        import aiohttp

        try:
            async with session.post(url, data=body, headers=_JSON_HEADERS) as resp:
                raw = await _read_capped(resp, url)
                if resp.status != 200:
                    retry_after = resp.headers.get("Retry-After")
                    try:
                        wait = float(retry_after) if retry_after else None
                    except ValueError:
                        wait = None
                    raise TeacherStatusError(resp.status, raw.decode("utf-8", "replace"), wait)
        except asyncio.TimeoutError:
            raise TeacherTimeout(f"no answer within {self.timeout_s:g}s from {url}") from None
        except aiohttp.ClientPayloadError as exc:
            raise TeacherProtocolError(f"broken body from {url}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise TeacherConnectionError(f"{type(exc).__name__} talking to {url}: {exc}") from None
        texts, reasons, logprobs, usage = parse_completion(raw)
        return TeacherResult(
            id="", ok=True, texts=texts, finish_reasons=reasons, logprobs=logprobs, usage=usage
        )

    def _delay(self, attempt: int, error: TeacherError) -> float:
        doubling = 2 ** min(attempt - 1, 40)  # long outage windows reach hundreds of attempts
        delay = min(self.backoff_max_s, self.backoff_s * doubling) * (0.5 + random.random())
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            delay = max(delay, min(float(retry_after), self.backoff_max_s))
        return delay

    def encode(self, request: ChatRequest) -> bytes:
        """The request's HTTP body (JSON bytes)."""
        return _dumps_bytes({**_request_body(self.model, request, self.response_format), **self.extra_body})

    async def complete(self, session: aiohttp.ClientSession, request: ChatRequest) -> TeacherResult:
        """Answer one request with retries; never raises, a failure comes back as a failed result."""
        result = await self.complete_body(session, request.id, self.encode(request))
        result.meta = request.meta
        return result

    async def complete_body(
        self, session: aiohttp.ClientSession, request_id: str, body: bytes
    ) -> TeacherResult:
        """Send one encoded request with retries; a failure comes back as a failed result."""
        started = time.perf_counter()
        error: TeacherError | None = None
        attempt = 0
        down_since: float | None = None  # first refused / timed-out attempt: the server may be restarting
        while True:
            attempt += 1
            url = self.endpoints[next(self._next_endpoint) % len(self.endpoints)]
            try:
                result = await self._attempt(session, url, body)
            except TeacherError as exc:
                error = exc
                if not exc.retryable:
                    break
                outage = isinstance(exc, (TeacherConnectionError, TeacherTimeout))
                if outage and down_since is None:
                    down_since = time.monotonic()
                delay = self._delay(attempt, exc)
                if attempt > self.max_retries:
                    # past max_retries only an outage is waited out, and only within the restart window
                    gone = time.monotonic() - down_since if down_since is not None else 0.0
                    left = self.outage_s - gone if outage else 0.0
                    if left <= 0:
                        break
                    delay = min(max(delay, OUTAGE_MIN_DELAY_S), left)
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # a bug or odd input must fail this request, not the whole batch
                error = TeacherError(f"{type(exc).__name__}: {exc}")
                break
            result.id, result.attempts = request_id, attempt
            result.latency_s = time.perf_counter() - started
            return result
        assert error is not None
        return TeacherResult(
            id=request_id,
            ok=False,
            error=str(error),
            error_kind=error.kind,
            attempts=attempt,
            latency_s=time.perf_counter() - started,
        )

    # ------------------------------------------------------------------ many requests
    def _session(self) -> aiohttp.ClientSession:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.api_key or 'EMPTY'}"}
        connector = aiohttp.TCPConnector(
            limit=self.concurrency, limit_per_host=self.concurrency, ttl_dns_cache=300
        )
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)

    async def run_all(self, requests: Iterable[ChatRequest], emit: Callable[[TeacherResult], None]) -> None:
        """Answer every request with ``concurrency`` workers, calling ``emit`` with each result; the
        requests are pulled one at a time, so a lazy iterator is built while earlier ones are in flight."""
        todo = iter(requests)

        async def worker(session: aiohttp.ClientSession) -> None:
            for request in todo:
                emit(await self.complete(session, request))

        workers = self.concurrency if not isinstance(requests, list) else min(self.concurrency, len(requests))
        async with self._session() as session:
            await asyncio.gather(*(worker(session) for _ in range(workers)))

    async def agenerate(self, requests: list[ChatRequest]) -> AsyncIterator[TeacherResult]:
        """Async form for notebooks and servers: yields results as they complete (no cache)."""
        out: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(self.run_all(requests, out.put_nowait))
        for _ in range(len(requests)):
            yield await out.get()
        await task

    streams_requests = True

    def _new_client(self) -> Any:
        """A ClientProcess for this client's settings; up to twice ``concurrency`` requests ahead."""
        from compeff.teachers.client_process import ClientProcess

        return ClientProcess(self._client_settings(), window=2 * self.concurrency)

    def _client_settings(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this client in the client process."""
        return {
            "model": self.model,
            "base_urls": [e.removesuffix("/chat/completions") for e in self.endpoints],
            "api_key": self.api_key,
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "backoff_s": self.backoff_s,
            "backoff_max_s": self.backoff_max_s,
            "extra_body": self.extra_body,
            "outage_s": self.outage_s,
        }

    def _generate(self, requests: Iterable[ChatRequest]) -> Iterator[TeacherResult]:
        if isinstance(requests, list) and not requests:
            return
        if self.client_process:
            if self._client is None:  # closed earlier: start again
                self._client = self._new_client()
            yield from self._client.generate(requests, self.encode)
            return
        results: queue.Queue = queue.Queue()
        buffer: list[TeacherResult] = []

        def emit(result: TeacherResult) -> None:
            # hand results over in small lists: one thread wake-up per burst, not per request
            buffer.append(result)
            if len(buffer) >= 64:
                results.put(buffer[:])
                buffer.clear()

        async def main() -> None:
            work = asyncio.create_task(self.run_all(requests, emit))
            while not work.done():
                await asyncio.wait([work], timeout=0.02)
                if buffer:
                    results.put(buffer[:])
                    buffer.clear()
            work.result()

        def run() -> None:
            try:
                run_loop(main())
            except BaseException as exc:  # surface loop crashes to the caller
                results.put(exc)
            finally:
                results.put(_DONE)

        thread = threading.Thread(target=run, name="openai-teacher", daemon=True)
        # the caller's per-result work runs in this thread; a short switch interval keeps it from
        # stalling the event loop (which must keep hundreds of connections moving) for 5 ms at a time
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
        thread.start()
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            sys.setswitchinterval(interval)

    def close(self) -> None:
        """Stop the client process, if one was started."""
        if self._client is not None:
            self._client.close()
            self._client = None
