"""Token ids of a chat as a student reads it (its chat template), for SFT's checks and logit KD."""

from __future__ import annotations

from typing import Any


def chat_token_ids(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    """The ids ``apply_chat_template`` gives the messages (with the assistant prompt when asked)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def chat_text(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    """The text ``apply_chat_template`` renders for the messages (with the assistant prompt when asked)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
