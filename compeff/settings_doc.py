"""The settings reference, generated from the recipe's pydantic models (the source ``--help`` reads too).

``docs/gen_settings.py`` writes one page per recipe section at ``mkdocs build`` time; nothing in those
pages is written by hand, so a new or changed setting shows up in the docs as soon as it is in
``compeff/config.py``.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from compeff.config import Recipe

# which page of the docs describes the stage each section configures
STAGE_PAGES = {
    "teach": "../teachers.md",
    "enumerate": "../stages/enumerate.md",
    "cluster": "../stages/cluster.md",
    "tasks": "../stages/tasks.md",
    "generate": "../stages/generate.md",
    "score": "../stages/score.md",
    "sample": "../stages/sample.md",
    "sft": "../stages/sft.md",
    "eval": "../stages/eval.md",
    "kd": "../stages/kd.md",
    "bench": "../stages/bench.md",
    "teacher": "../teachers.md",
    "run": "../run.md",
    "data": "../data.md",
}


def type_name(annotation: Any) -> str:
    """A short, readable name of a field's type (``int | None``, ``list[str]``, ``'a' | 'b'``)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args if a is not Ellipsis)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(typing|pydantic\.networks)\.", "", str(annotation))


def default_text(field: FieldInfo) -> str:
    """The field's default as a recipe would spell it (YAML-ish JSON)."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    try:
        return json.dumps(value, default=str)
    except TypeError:
        return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def field_rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    """(recipe key, type, default, description) of every field, nested sections flattened."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.append((key, "section", "", field.description or ""))
            rows += field_rows(annotation, key)
            continue
        rows.append((key, type_name(annotation), default_text(field), field.description or ""))
    return rows


def section_page(section: str) -> str:
    """The Markdown page of one recipe section."""
    model = Recipe.model_fields[section].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    lines = [
        f"# `{section}` settings",
        "",
        f"Generated from `compeff/config.py` ({model.__name__}); `compeff <stage> --help` reads the same "
        "descriptions. Set a key in a recipe, with `--set key=value`, or with the stage's flag.",
        "",
    ]
    if section in STAGE_PAGES:
        lines += [f"What it does: [{section}]({STAGE_PAGES[section]}).", ""]
    lines += ["| recipe key | type | default | description |", "|---|---|---|---|"]
    for key, kind, default, description in field_rows(model, section):
        lines.append(f"| `{key}` | {_cell(kind)} | `{_cell(default)}` | {_cell(description)} |")
    return "\n".join(lines) + "\n"


def settings_pages() -> dict[str, str]:
    """``settings/<section>.md`` -> its page, for every section of a recipe, plus an index."""
    pages = {f"settings/{name}.md": section_page(name) for name in Recipe.model_fields}
    index = [
        "# Settings reference",
        "",
        "One page per recipe section, generated from the pydantic models:",
        "",
    ]
    index += [f"- [`{name}`]({name}.md)" for name in Recipe.model_fields]
    pages["settings/index.md"] = "\n".join(index) + "\n"
    return pages


def undocumented_fields() -> list[str]:
    """Recipe keys whose field has no description (a test keeps this empty)."""
    missing = []
    for section in Recipe.model_fields:
        model = Recipe.model_fields[section].annotation
        missing += [key for key, _, _, text in field_rows(model, section) if not text.strip()]
    return missing
