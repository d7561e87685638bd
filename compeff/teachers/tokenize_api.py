"""The served model's own tokens for a few words, through the server's tokenize endpoints.

Label-word scoring over HTTP reads the top log-probabilities of the answer's first token; to know which
of those tokens stand for which label, compeff asks the server how its tokenizer starts each label word.
Three dialects are known: llama-cpp-python (``/extras/tokenize``, ``/extras/detokenize``), vLLM
(``/tokenize``, ``/detokenize`` with the model name) and llama.cpp's own server (``/tokenize``,
``/detokenize`` with ``content``). A server with none of them (e.g. api.openai.com) gets ``None``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


def _post(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - the recipe's own server
        answer = json.loads(resp.read(1 << 20))
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    return answer


Dialect = tuple[Callable[[str], list[int]], Callable[[list[int]], str]]


def _dialects(root: str, model: str, api_key: str | None, timeout: float) -> list[Dialect]:
    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _post(root + path, body, api_key, timeout)

    return [
        (  # llama-cpp-python's server
            lambda text: post("/extras/tokenize", {"input": text, "model": model})["tokens"],
            lambda ids: post("/extras/detokenize", {"tokens": ids, "model": model})["text"],
        ),
        (  # vLLM
            lambda text: post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})[
                "tokens"
            ],
            lambda ids: post("/detokenize", {"model": model, "tokens": ids})["prompt"],
        ),
        (  # llama.cpp's own server
            lambda text: post("/tokenize", {"content": text})["tokens"],
            lambda ids: post("/detokenize", {"tokens": ids})["content"],
        ),
    ]


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
    server offers no tokenize endpoint compeff knows."""
    root = base_url.rstrip("/")
    root = root[: -len("/v1")] if root.endswith("/v1") else root
    for tokenize, detokenize in _dialects(root, model, api_key, timeout):
        try:
            return {text: first_piece(tokenize, detokenize, text) for text in texts}
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
            continue
    return None
