"""Prompt templates, one file per teacher call; ``{placeholders}`` are filled with str.format."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def load_prompt(name: str) -> str:
    """The template ``compeff/prompts/<name>.txt``."""
    return resources.files(__package__).joinpath(f"{name}.txt").read_text(encoding="utf-8")


def render_prompt(template: str, **fields: str) -> str:
    """Fill a template's placeholders; a missing field raises KeyError naming it."""
    return load_prompt(template).format(**fields)
