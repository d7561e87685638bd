"""The served model's own tokens for a few words, through the server's tokenize endpoints.

Label-word scoring over HTTP reads the top log-probabilities of the answer's first token; to know which
of those tokens stand for which label, compeff asks the server how its tokenizer starts each label word.
Three dialects are known: llama-cpp-python (``/extras/tokenize``, ``/extras/detokenize``), vLLM
(``/tokenize``, ``/detokenize`` with the model name) and llama.cpp's own server (``/tokenize``,
``/detokenize`` with ``content``). A server with none of them (e.g. api.openai.com) gets ``None``; a server
that cannot be reached (refused, timed out, 5xx) raises :class:`TokenizerUnreachable`, so callers never
remember an outage as "no endpoint".

The same endpoints fingerprint the served tokenizer (:func:`served_vocabulary`): the ids it gives a fixed
set of texts, compared with the student's tokenizer doing the same before its ids are trusted for KD.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compeff.teachers.endpoints import DIRECT
from compeff.top_logprobs import probe_fingerprint


def _post(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with DIRECT.open(request, timeout=timeout) as resp:  # the recipe's own server, never via $HTTP_PROXY
        answer = json.loads(resp.read(1 << 20))
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    return answer


Dialect = tuple[str, Callable[[str], list[int]], Callable[[list[int]], str]]
VLLM = "vllm"  # the dialect whose chat completions accept return_tokens_as_token_ids


class TokenizerUnreachable(ConnectionError):
    """The server did not answer its tokenize endpoints (refused, timed out or a server error): an
    outage to ask about again later, not a server without such endpoints."""


def _tokens(answer: dict[str, Any], text: str) -> list[int]:
    """The ids of a tokenize answer; ValueError (not this dialect) when a non-empty text got none:
    llama.cpp's own server answers 200 ``{"tokens": []}`` to a body without its ``content`` (vLLM's
    dialect asked of it), and every server gives a non-empty text at least one token."""
    ids = answer["tokens"]
    if not isinstance(ids, list):
        raise TypeError(f"tokens is not a list: {type(ids).__name__}")
    if text and not ids:
        raise ValueError("no tokens for a non-empty text: the server did not read this dialect's body")
    return [int(i) for i in ids]


def _dialects(root: str, model: str, api_key: str | None, timeout: float) -> list[Dialect]:
    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _post(root + path, body, api_key, timeout)

    return [
        (
            "llama-cpp-python",
            lambda text: _tokens(post("/extras/tokenize", {"input": text, "model": model}), text),
            lambda ids: post("/extras/detokenize", {"tokens": ids, "model": model})["text"],
        ),
        (
            VLLM,
            lambda text: _tokens(
                post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False}), text
            ),
            lambda ids: post("/detokenize", {"model": model, "tokens": ids})["prompt"],
        ),
        (
            "llama.cpp",
            lambda text: _tokens(post("/tokenize", {"content": text}), text),
            lambda ids: post("/detokenize", {"tokens": ids})["content"],
        ),
    ]


def _is_outage(exc: Exception) -> bool:
    """A failure that says nothing about which endpoints the server has: no connection, a timeout, a
    server error or a rate limit (a 4xx other than 408 / 429, or an odd answer, means "not this dialect")."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return isinstance(exc, OSError)  # URLError (refused, DNS), socket timeouts, resets


def _root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


_ASK_ERRORS = (urllib.error.URLError, OSError, ValueError, KeyError, TypeError)


def _first_dialect(
    base_url: str, model: str, api_key: str | None, timeout: float, ask: Callable[[Dialect], Any]
) -> tuple[str, Any] | None:
    """(name, answer) of the first dialect ``ask`` succeeds with; None when the server has none of them;
    TokenizerUnreachable when none succeeded and at least one failed by an outage."""
    outage: Exception | None = None
    for dialect in _dialects(_root(base_url), model, api_key, timeout):
        try:
            return dialect[0], ask(dialect)
        except _ASK_ERRORS as exc:
            if _is_outage(exc):
                outage = exc
    if outage is not None:
        raise TokenizerUnreachable(f"{base_url}: its tokenize endpoint did not answer ({outage})")
    return None


def first_piece(
    tokenize: Callable[[str], list[int]], detokenize: Callable[[list[int]], str], text: str
) -> str:
    """The text of the first token of ``text`` (special tokens such as BOS, which decode to nothing or
    to text that does not start ``text``, are skipped)."""
    for token in tokenize(text):
        piece = detokenize([int(token)])
        if piece and text.startswith(piece):
            return piece
    raise ValueError(f"no token of {text!r} decodes to its start")


def served_first_pieces(
    base_url: str, model: str, texts: list[str], api_key: str | None = None, timeout: float = 10.0
) -> dict[str, str] | None:
    """For each text, the first token the served model's tokenizer gives it, as text; None when the
    server offers no tokenize endpoint compeff knows (TokenizerUnreachable when it does not answer)."""

    def ask(dialect: Dialect) -> dict[str, str]:
        _, tokenize, detokenize = dialect
        return {text: first_piece(tokenize, detokenize, text) for text in texts}

    found = _first_dialect(base_url, model, api_key, timeout, ask)
    return None if found is None else found[1]


@dataclass(frozen=True)
class ServedVocabulary:
    """What a server says about its tokenizer: the dialect it speaks and its probe fingerprint."""

    url: str
    dialect: str
    fingerprint: str


def served_vocabulary(
    base_url: str, model: str, api_key: str | None = None, timeout: float = 10.0
) -> ServedVocabulary | None:
    """The served tokenizer's :func:`~compeff.top_logprobs.probe_fingerprint`, from the ids its
    tokenize endpoint gives the probe texts (a leading BOS the server adds to every text, as the ids
    of the empty text show, is left out); None when the server has no tokenize endpoint compeff knows."""

    def ask(dialect: Dialect) -> str:
        tokenize = dialect[1]
        try:
            prefix = [int(i) for i in tokenize("")]
        except urllib.error.HTTPError as exc:
            if _is_outage(exc):
                raise
            prefix = []  # a server that refuses an empty text adds nothing to it either

        def own_ids(text: str) -> list[int]:
            ids = [int(i) for i in tokenize(text)]
            return ids[len(prefix) :] if prefix and ids[: len(prefix)] == prefix else ids

        return probe_fingerprint(own_ids)

    found = _first_dialect(base_url, model, api_key, timeout, ask)
    return None if found is None else ServedVocabulary(base_url, found[0], found[1])
