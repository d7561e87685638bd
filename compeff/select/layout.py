"""How a chat sample becomes the token sequence a scorer reads, and where its response sits in it.

Two layouts: ``plain`` (the paper's: instruction, a separator, the response; no template) and
``chat`` (the scorer's chat template). The response tokens are found from the tokenizer's character
offsets of the rendered text, never by searching for the response string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Layout = Literal["plain", "chat"]
Side = Literal["left", "right"]


class LayoutError(ValueError):
    """A sample cannot be laid out (no assistant answer, template mismatch, ...)."""


@dataclass
class Example:
    """One sample, tokenised: ``positions`` index the response tokens in ``input_ids``."""

    id: str
    input_ids: list[int]
    positions: list[int]
    response_tokens: int  # response tokens before truncation
    truncated: bool
    alone_ids: list[int] | None = None  # the response on its own (for IFD)
    alone_positions: list[int] | None = None


def split_sample(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The messages before the final assistant answer, and that answer."""
    if not messages or messages[-1].get("role") != "assistant":
        raise LayoutError("the last message is not an assistant answer")
    response = messages[-1].get("content")
    if not isinstance(response, str) or not response:
        raise LayoutError("the assistant answer is empty")
    return messages[:-1], response


def render(
    messages: list[dict[str, Any]], layout: Layout, separator: str, tokenizer: Any = None
) -> tuple[str, int, int]:
    """Text to score and the character span [start, end) of the response inside it."""
    prompt, response = split_sample(messages)
    if layout == "plain":
        instruction = "\n\n".join(str(m.get("content", "")) for m in prompt)
        head = instruction + separator if instruction else ""
        return head + response, len(head), len(head) + len(response)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LayoutError("layout 'chat' needs a scorer tokenizer with a chat template")
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(head) or full[len(head) : len(head) + len(response)] != response:
        raise LayoutError("the chat template does not render the prompt as a prefix of the full chat")
    return full, len(head), len(head) + len(response)


def _span_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens that cover any character of [start, end)."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end]


def _truncate(
    ids: list[int], positions: list[int], max_length: int, side: Side
) -> tuple[list[int], list[int], bool]:
    if len(ids) <= max_length:
        return ids, positions, False
    if side == "right":
        return ids[:max_length], [p for p in positions if p < max_length], True
    cut = len(ids) - max_length
    return ids[cut:], [p - cut for p in positions if p - cut >= 0], True


def tokenize_sample(
    sample_id: str,
    messages: list[dict[str, Any]],
    tokenizer: Any,
    layout: Layout = "plain",
    separator: str = "\n",
    max_length: int = 2048,
    truncation_side: Side = "right",
    with_alone: bool = False,
) -> Example:
    """Tokenise one sample and locate its response tokens (position 0 is never scored: nothing
    precedes it)."""
    if not getattr(tokenizer, "is_fast", False):
        raise LayoutError("the scorer needs a fast tokenizer (character offsets)")
    text, start, end = render(messages, layout, separator, tokenizer)
    enc = tokenizer(text, add_special_tokens=layout == "plain", return_offsets_mapping=True)
    positions = _span_tokens(enc["offset_mapping"], start, end)
    ids, kept, truncated = _truncate(list(enc["input_ids"]), positions, max_length, truncation_side)
    example = Example(
        sample_id, ids, [p for p in kept if p > 0], len(positions), truncated and len(kept) < len(positions)
    )
    if with_alone:
        _, response = split_sample(messages)
        alone = tokenizer(response, add_special_tokens=True, return_offsets_mapping=True)
        alone_ids = list(alone["input_ids"])
        alone_pos = _span_tokens(alone["offset_mapping"], 0, len(response))
        start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start_id is not None and (not alone_ids or alone_ids[0] != start_id):
            # a start token, so that the first response token is predicted too
            alone_ids, alone_pos = [start_id, *alone_ids], [p + 1 for p in alone_pos]
        alone_ids, alone_kept, _ = _truncate(alone_ids, alone_pos, max_length, "right")
        example.alone_ids = alone_ids
        example.alone_positions = [p for p in alone_kept if p > 0]
    return example
