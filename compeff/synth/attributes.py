"""Attribute enumeration: parse the teacher's lists, normalise names, count over texts.

The parser survives real teacher output: bold or plain names, ``1.`` / ``1)`` / ``-`` / ``*`` bullets,
missing descriptions, prose before and after, markdown headers, labelled sub-lines ("Description:",
"Value:"), duplicated items and non-English text. An answer with no item raises
:class:`AttributeParseError`; the stage keeps the raw text in ``failures.jsonl``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_ITEM = re.compile(r"^(?P<indent>[ \t]*)(?:(?P<num>\d{1,3})\s*[.)]|(?P<bullet>[-*•+]))\s+(?P<body>\S.*)$")
_BOLD_LEAD = re.compile(r"^[ \t]*(?:\*\*|__)(?P<body>.+)$")
_HEADER = re.compile(r"^\s*#{1,6}\s")
_BOLD = re.compile(r"^(?:\*\*|__)(?P<name>.+?)(?:\*\*|__)\s*(?P<rest>.*)$")
_LABEL = re.compile(
    r"^\s*(?:[-*•+]\s*)?(?:\*\*|__)?(?P<label>(?:attribute\s+)?(?:description|value|values|example|in this text|"
    r"attribute value|attribute description))(?:\*\*|__)?\s*(?:\*\*|__)?\s*[:：\-–—]\s*(?:\*\*|__)?(?P<text>.*)$",
    re.IGNORECASE,
)
_INLINE_VALUE = re.compile(
    r"[\s(\[]*(?:attribute\s+)?value(?:\s+in\s+this\s+text)?\s*[:：]\s*(?P<value>.+?)[)\].]*\s*$",
    re.IGNORECASE,
)
_SEPARATORS = re.compile(r"\s*(?::|：|\s[-–—]\s)\s*")
_MAX_NAME_WORDS = 8


class AttributeParseError(ValueError):
    """The teacher's answer holds no attribute item."""


@dataclass
class ParsedAttribute:
    """One item of a teacher answer, before normalisation."""

    name: str
    description: str = ""
    value: str = ""


@dataclass
class _Item:
    indent: int
    first: str
    more: list[str] = field(default_factory=list)


def _strip_md(text: str) -> str:
    text = re.sub(r"(\*\*|__|`)", "", text)
    return text.strip().strip("*_").strip()


def _is_label_line(text: str) -> bool:
    return bool(_LABEL.match(text))


def _split_items(answer: str) -> list[_Item]:
    """Group the answer's lines into items: a bullet / number / bold-led line starts one; indented lines,
    labelled lines and lines right below it continue it; prose after a blank line is ignored."""
    items: list[_Item] = []
    after_blank = False
    for raw in answer.replace("\r\n", "\n").split("\n"):
        if not raw.strip():
            after_blank = True
            continue
        line = raw
        header = _HEADER.match(line)
        if header:
            content = line[header.end() :]
            if not (_ITEM.match(content) or _BOLD_LEAD.match(content)):
                after_blank = True  # a section header ends the item above it
                continue
            line = content
        match = _ITEM.match(line)
        if match and not _is_label_line(match.group("body")):
            indent = len(match.group("indent").expandtabs(4))
            if not (items and indent > items[-1].indent):
                items.append(_Item(indent=indent, first=match.group("body").strip()))
                after_blank = False
                continue
        elif not match and _BOLD_LEAD.match(line) and not _is_label_line(line) and not line[0].isspace():
            items.append(_Item(indent=0, first=line.strip()))
            after_blank = False
            continue
        if items and (raw[0] in " \t" or _is_label_line(line) or not after_blank):
            items[-1].more.append(line.strip())
        after_blank = False
    return items


def _name_and_rest(first: str) -> tuple[str, str] | None:
    first = first.strip()
    bold = _BOLD.match(first)
    if bold:
        name, rest = bold.group("name"), bold.group("rest")
        if ":" in name and not name.rstrip().endswith(":"):  # "**Tone: negative**"
            name, _, tail = name.partition(":")
            rest = (tail + " " + rest).strip()
        name = re.sub(r"^\d{1,3}\s*[.)]\s*", "", name.strip()).rstrip(":：").strip()
        rest = re.sub(r"^[\s:：\-–—]+", "", rest)
        return name, rest
    parts = _SEPARATORS.split(first, maxsplit=1)
    if len(parts) == 2 and parts[0].strip():
        return _strip_md(parts[0]), parts[1]
    if len(first.split()) <= 5:
        return _strip_md(first.rstrip(".")), ""
    return None


def _describe(rest: str, more: list[str]) -> tuple[str, str]:
    description_parts: list[str] = []
    value = ""
    for chunk in [rest, *more]:
        if not chunk.strip():
            continue
        label = _LABEL.match(chunk)
        if label:
            kind = label.group("label").lower()
            text = _strip_md(label.group("text"))
            if "value" in kind or "example" in kind or "in this text" in kind:
                value = value or text
            else:
                description_parts.append(text)
            continue
        inline = _INLINE_VALUE.search(chunk)
        if inline:
            value = value or _strip_md(inline.group("value"))
            chunk = chunk[: inline.start()]
        description_parts.append(_strip_md(chunk.lstrip("-*• ")))
    description = " ".join(p for p in description_parts if p).strip()
    return re.sub(r"\s+", " ", description), value.strip().rstrip(".")


# one whole attribute object of the structured-output form (the grammar fixes its keys and their order)
_JSON_ITEM = re.compile(
    r'\{\s*"name"\s*:\s*"(?:[^"\\]|\\.)*"\s*,\s*"description"\s*:\s*"(?:[^"\\]|\\.)*"\s*,'
    r'\s*"value"\s*:\s*"(?:[^"\\]|\\.)*"\s*\}'
)


def _json_item(text: str) -> dict[str, Any] | None:
    """One whole attribute object, or None when it does not decode (raw control characters inside its
    strings are accepted: llama.cpp's grammars let them through)."""
    try:
        item = json.loads(text, strict=False)
    except ValueError:
        return None
    return item if isinstance(item, dict) else None


def _json_attributes(answer: str) -> list[tuple[str, str, str]] | None:
    """(name, description, value) of a JSON answer {"attributes": [...]}, or None when it is not one."""
    if not answer.lstrip().startswith(("{", "[")):
        return None
    from compeff.synth.jsonparse import parse_json_lenient

    try:
        value = parse_json_lenient(answer)
    except ValueError:  # cut at max_tokens: keep the items that were written whole
        items = [item for m in _JSON_ITEM.finditer(answer) if (item := _json_item(m.group(0)))]
        return [(i["name"], i["description"], i["value"]) for i in items] or None
    items = value.get("attributes") if isinstance(value, dict) else value
    if not isinstance(items, list):
        return None
    return [
        (str(i.get("name") or ""), str(i.get("description") or ""), str(i.get("value") or ""))
        for i in items
        if isinstance(i, dict)
    ]


def parse_attributes(answer: str) -> list[ParsedAttribute]:
    """Items of a teacher answer as (name, description, value), from JSON ({"attributes": [...]}, the
    structured-output form) or a numbered list; duplicates (same name) kept once."""
    out: list[ParsedAttribute] = []
    seen: set[str] = set()
    as_json = _json_attributes(answer)
    if as_json is not None:
        for name, description, value in as_json:
            name = re.sub(r"\s+", " ", name).strip(" .\"'“”")
            if name and len(name.split()) <= _MAX_NAME_WORDS and name.lower() not in seen:
                seen.add(name.lower())
                out.append(ParsedAttribute(name=name, description=description.strip(), value=value.strip()))
        if not out:
            raise AttributeParseError("no attribute in the JSON answer")
        return out
    for item in _split_items(answer):
        parsed = _name_and_rest(item.first)
        if parsed is None:
            continue
        name, rest = parsed
        name = re.sub(r"\s+", " ", name).strip(" .\"'“”")
        if not name or len(name.split()) > _MAX_NAME_WORDS:
            continue
        description, value = _describe(rest, item.more)
        key = name.lower()
        if key in seen:
            continue
        seen.add(key)
        out.append(ParsedAttribute(name=name, description=description, value=value))
    if not out:
        raise AttributeParseError("no attribute item found")
    return out


def normalise_name(name: str) -> list[str]:
    """DESIGN's rules: lowercase, keep the text before ':', split on '/', strip a leading 'use of '."""
    name = name.lower().split(":", 1)[0]
    names = []
    for part in name.split("/"):
        part = re.sub(r"\s+", " ", part).strip(" .,;\"'“”()[]*_`")
        part = re.sub(r"^use of\s+", "", part)
        if part:
            names.append(part)
    return names


@dataclass
class AttributeStats:
    """Aggregate of one normalised attribute name over all texts."""

    name: str
    count: int = 0
    descriptions: Counter = field(default_factory=Counter)
    values: Counter = field(default_factory=Counter)
    text_ids: list[str] = field(default_factory=list)

    def to_record(self, n_values: int = 5) -> dict:
        return {
            "id": self.name,
            "name": self.name,
            "description": self.descriptions.most_common(1)[0][0] if self.descriptions else "",
            "count": self.count,
            "example_values": [v for v, _ in self.values.most_common(n_values)],
            "text_ids": self.text_ids,
        }


def count_attributes(per_text: Iterable[tuple[str, list[dict]]]) -> dict[str, AttributeStats]:
    """Count names over texts (once per text), keeping descriptions and values by frequency."""
    stats: dict[str, AttributeStats] = defaultdict(lambda: AttributeStats(name=""))
    for text_id, attributes in per_text:
        seen_here: set[str] = set()
        for attribute in attributes:
            for name in normalise_name(attribute["name"]):
                entry = stats[name]
                entry.name = name
                if attribute.get("description"):
                    entry.descriptions[attribute["description"]] += 1
                if attribute.get("value"):
                    entry.values[attribute["value"].lower()] += 1
                if name not in seen_here:
                    seen_here.add(name)
                    entry.count += 1
                    entry.text_ids.append(text_id)
    return dict(stats)


_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "for",
        "with",
        "this",
        "that",
        "it",
        "its",
        "is",
        "are",
        "be",
        "text",
        "value",
        "name",
    ]
)


def prompt_echoes(prompt: str) -> set[str]:
    """Normalised names a weak teacher copies back from the enumerate prompt instead of reading the
    text: its answer-shape placeholder ("Attribute name") and the examples it quotes ("tone", ...)."""
    echoes = set(normalise_name("attribute name"))
    for quoted in re.findall(r'"([^"\n]{2,40})"', prompt):
        echoes.update(normalise_name(quoted))
    for placeholder in re.findall(r"\*\*([^*\n]{2,40})\*\*", prompt):
        echoes.update(normalise_name(placeholder))
    return echoes


def junk_name(name: str) -> bool:
    """A normalised name that cannot be an attribute: no word of three letters, or only stopwords."""
    words = re.findall(r"[^\W\d_]+", name)
    return not any(len(w) >= 3 for w in words) or all(w in _STOPWORDS for w in words)


def drop_echoes_and_junk(
    stats: dict[str, AttributeStats], echoes: set[str]
) -> tuple[dict[str, AttributeStats], dict[str, int]]:
    """The stats without prompt echoes and junk names, and how many names (and mentions) were dropped."""
    kept, dropped = {}, {"echoes": 0, "echo_mentions": 0, "junk": 0, "junk_mentions": 0}
    for name, entry in stats.items():
        kind = "echoes" if name in echoes else "junk" if junk_name(name) else None
        if kind is None:
            kept[name] = entry
            continue
        dropped[kind] += 1
        dropped["echo_mentions" if kind == "echoes" else "junk_mentions"] += entry.count
    return kept, dropped


def min_count_threshold(n_texts: int, min_count: int, min_frac: float | None) -> int:
    """The count an attribute needs: min_count, or ceil(min_frac * texts) when the relative form is set."""
    if min_frac is not None:
        return max(1, math.ceil(min_frac * n_texts))
    return min_count
