"""A loopback OpenAI-compatible chat-completions server with fault injection.

It answers deterministically (the answer is a function of the messages), can add latency, and can
inject 500s, 429s, stalls past the client's deadline, malformed bodies and dropped connections.
Used by the tests of the ``openai`` backend and by ``compeff bench teacher``. It binds to loopback
addresses only and stops by itself after ``max_seconds``.

Run standalone: ``python -m compeff.teachers.fake_server --port 8011 --latency-ms 50``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

LOOPBACK = ("127.0.0.1", "localhost", "::1")

Responder = Callable[[list[dict], dict], str]

#: tokenize dialects the fake server can speak (with a tokenizer): vLLM's, and llama.cpp's own server's
TOKENIZE_DIALECTS = ("vllm", "llama.cpp")


@dataclass
class FaultPlan:
    """Which faults to inject. Rates are per attempt; ``fail_first`` faults a prompt's first attempts.

    A prompt containing ``[[always:KIND]]`` fails with KIND on every attempt (kinds: 500, 429, stall,
    malformed, drop); ``[[first:N:KIND]]`` fails its first N attempts with KIND, then succeeds.
    """

    error_500: float = 0.0
    error_429: float = 0.0
    stall: float = 0.0
    malformed: float = 0.0
    drop: float = 0.0
    stall_seconds: float = 30.0
    seed: int = 0
    #: the first N calls to the tokenize endpoint (served with a tokenizer) answer HTTP 500
    tokenize_fail_first: int = 0


def default_responder(messages: list[dict], body: dict) -> str:
    """Deterministic answer: a digest of the conversation plus an echo of the last user message."""
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    return f"answer-{digest}: {str(last)[:120]}"


@dataclass
class ServerStats:
    requests: int = 0
    tokenize_calls: int = 0
    faults: Counter = field(default_factory=Counter)
    attempts_by_prompt: Counter = field(default_factory=Counter)


STATS = web.AppKey("stats", ServerStats)


def _prompt_key(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def _marked_fault(messages: list[dict], attempt: int) -> str | None:
    text = " ".join(str(m.get("content", "")) for m in messages)
    if "[[always:" in text:
        return text.split("[[always:", 1)[1].split("]]", 1)[0]
    if "[[first:" in text:
        n, kind = text.split("[[first:", 1)[1].split("]]", 1)[0].split(":", 1)
        if attempt <= int(n):
            return kind
    return None


def make_app(
    latency_ms: float = 0.0,
    faults: FaultPlan | None = None,
    responder: Responder = default_responder,
    model: str = "fake-teacher",
    tokenizer: Any = None,
    tokenize_dialect: str = "vllm",
) -> web.Application:
    """Build the aiohttp application (routes: /v1/chat/completions, /v1/models, /stats). With a
    ``tokenizer`` (a transformers tokenizer or its path) it also speaks vLLM's ``/tokenize`` and
    ``/detokenize``, and an answer's log-probabilities are over that tokenizer's tokens (named
    ``token_id:N`` when the request sets ``return_tokens_as_token_ids``), as a vLLM server's are.

    ``tokenize_dialect="llama.cpp"`` speaks llama.cpp's own server (``llama-server``, its
    ``handle_tokenize`` / ``handle_detokenize``) instead: ``/tokenize`` reads ``content`` (special tokens
    only with ``add_special``) and answers 200 ``{"tokens": []}`` to a body without it, ``/detokenize``
    answers ``{"content": ...}``, and log-probability entries carry their token's ``id``."""
    if tokenize_dialect not in TOKENIZE_DIALECTS:
        raise ValueError(f"tokenize_dialect: one of {TOKENIZE_DIALECTS}, not {tokenize_dialect!r}")
    llamacpp = tokenize_dialect == "llama.cpp"
    plan = faults or FaultPlan()
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    rng = random.Random(plan.seed)
    stats = ServerStats()
    app = web.Application()
    app[STATS] = stats

    def choose_fault(messages: list[dict]) -> str | None:
        key = _prompt_key(messages)
        stats.attempts_by_prompt[key] += 1
        marked = _marked_fault(messages, stats.attempts_by_prompt[key])
        if marked:
            return marked
        roll = rng.random()
        for kind, rate in (
            ("500", plan.error_500),
            ("429", plan.error_429),
            ("stall", plan.stall),
            ("malformed", plan.malformed),
            ("drop", plan.drop),
        ):
            if roll < rate:
                return kind
            roll -= rate
        return None

    async def chat(request: web.Request) -> web.StreamResponse:
        stats.requests += 1
        try:
            body = await request.json()
            messages = body["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return web.json_response({"error": {"message": "bad request body"}}, status=400)
        fault = choose_fault(messages)
        if fault:
            stats.faults[fault] += 1
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000.0)
        if fault == "500":
            return web.json_response({"error": {"message": "injected server error"}}, status=500)
        if fault == "429":
            return web.json_response(
                {"error": {"message": "injected rate limit"}}, status=429, headers={"Retry-After": "0.05"}
            )
        if fault == "stall":
            await asyncio.sleep(plan.stall_seconds)
        if fault == "malformed":
            return web.Response(text='{"id": "x", "choices": [ {"message": ', content_type="application/json")
        if fault == "drop":
            request.transport.close()
            return web.Response(status=500)
        n = int(body.get("n") or 1)
        content = responder(messages, body)
        first_tops = None
        if isinstance(content, tuple):  # (text, top log-probabilities of the first token)
            content, first_tops = content
        finish = "stop"
        if isinstance(content, dict):  # a raw answer: {"content": any JSON value, "finish_reason": ...}
            finish = content.get("finish_reason", "stop")
            content = content.get("content")
        choices = []
        for i in range(n):
            text = content if n == 1 or not isinstance(content, str) else f"{content} #{i}"
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if body.get("logprobs"):
                k = int(body.get("top_logprobs") or 0)
                entries = []
                for j, (tok, tok_id) in enumerate(answer_tokens(str(text), body)):
                    entry = {"token": tok, "logprob": -0.1 * (j % 5)}
                    if llamacpp and tok_id is not None:
                        entry = {"id": tok_id, **entry}
                    tops = first_tops if j == 0 and first_tops else [dict(entry)]
                    entries.append({**entry, "top_logprobs": tops[:k]})
                choice["logprobs"] = {"content": entries}
            choices.append(choice)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = sum(len(str(c["message"]["content"]).split()) for c in choices)
        return web.json_response(
            {
                "id": f"chatcmpl-{stats.requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", model),
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    def answer_tokens(text: str, body: dict) -> list[tuple[str, int | None]]:
        """The answer's tokens as the log-probabilities name them, with their ids: words (no id) without
        a tokenizer, else the tokenizer's tokens as text (or ``token_id:N``)."""
        if tokenizer is None:
            return [(word, None) for word in text.split()[:64]]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if body.get("return_tokens_as_token_ids") and not llamacpp:
            return [(f"token_id:{i}", i) for i in ids]
        return [(tokenizer.decode([i]), i) for i in ids]

    async def tokenize(request: web.Request) -> web.Response:
        stats.requests += 1
        stats.tokenize_calls += 1
        if stats.tokenize_calls <= plan.tokenize_fail_first:
            stats.faults["tokenize"] += 1
            return web.json_response({"error": {"message": "injected server error"}}, status=500)
        if llamacpp:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return web.json_response({"error": {"message": "bad request body"}}, status=400)
            if not isinstance(body, dict) or "content" not in body:
                return web.json_response({"tokens": []})  # llama-server: no content, no tokens, still 200
            ids = tokenizer(str(body["content"]), add_special_tokens=bool(body.get("add_special", False)))
            return web.json_response({"tokens": ids["input_ids"]})
        try:
            body = await request.json()
            text = body["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return web.json_response({"error": {"message": "bad request body"}}, status=400)
        special = bool(body.get("add_special_tokens", True))
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": 2048})

    async def detokenize(request: web.Request) -> web.Response:
        stats.requests += 1
        try:
            body = await request.json()
            ids = [int(i) for i in body.get("tokens", [])] if llamacpp else [int(i) for i in body["tokens"]]
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return web.json_response({"error": {"message": "bad request body"}}, status=400)
        return web.json_response({"content" if llamacpp else "prompt": tokenizer.decode(ids)})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response({"requests": stats.requests, "faults": dict(stats.faults)})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", get_stats)
    if tokenizer is not None:
        app.router.add_post("/tokenize", tokenize)
        app.router.add_post("/detokenize", detokenize)
    return app


class FakeServer:
    """Runs the fake server in a background thread on a free loopback port (context manager)."""

    def __init__(
        self,
        latency_ms: float = 0.0,
        faults: FaultPlan | None = None,
        responder: Responder = default_responder,
        host: str = "127.0.0.1",
        max_seconds: float = 600.0,
        tokenizer: Any = None,
        tokenize_dialect: str = "vllm",
    ):
        if host not in LOOPBACK:
            raise ValueError(f"fake server binds to loopback only, not {host}")
        self.app = make_app(
            latency_ms, faults, responder, tokenizer=tokenizer, tokenize_dialect=tokenize_dialect
        )
        self.host = host
        self.max_seconds = max_seconds
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def stats(self) -> ServerStats:
        return self.app[STATS]

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            runner = web.AppRunner(self.app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self.host, 0, backlog=1024)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._stop = asyncio.Event()
            self._ready.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.max_seconds)
            await runner.cleanup()

        self._loop.run_until_complete(main())
        self._loop.close()

    def start(self) -> FakeServer:
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-openai-server")
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("fake server did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stop and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve until ``--max-seconds`` pass; prints 'READY <port>' once listening."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", choices=LOOPBACK)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--script", choices=["echo", "pipeline"], default="echo", help="how to answer")
    args = parser.parse_args(argv)
    from compeff.teachers.scripted import RESPONDERS

    responder = RESPONDERS[args.script] or default_responder

    async def serve() -> None:
        runner = web.AppRunner(make_app(args.latency_ms, responder=responder), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=2048)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"READY {port}", flush=True)
        await asyncio.sleep(args.max_seconds)
        await runner.cleanup()

    from compeff.teachers.openai_api import run_loop

    run_loop(serve())


if __name__ == "__main__":
    main()
