"""Loaders for user texts and labelled sets: jsonl(.gz), json, parquet, csv, saved HF datasets, hub names.

Short names (``imdb:unsupervised``, ``tweeteval_sentiment:test``) resolve to a data folder (the recipe's
``data.dir`` or $COMPEFF_DATA_DIR), then to the sample shipped in ``compeff/sample_data``, then to the
Hugging Face hub.
HTML line breaks are cleaned; empty or non-text rows are reported with their file and line, never
crashed on.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

LABEL_NAMES: dict[str, list[str]] = {
    "imdb": ["negative", "positive"],
    "tweeteval_sentiment": ["negative", "neutral", "positive"],
}

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]+")
_SHORT = re.compile(r"^([A-Za-z0-9_\-]+):([A-Za-z0-9_\-]+)$")


class DataError(ValueError):
    """A data source is missing or unreadable; the message names the source (and line)."""


MAX_CLASSES = 1000  # more label values than this is a wrong field, not a classification set


def check_text(where: str, text: str) -> str:
    """The text, or a DataError naming ``where`` when it cannot be written as UTF-8 (a lone surrogate
    such as ``\\ud83d`` from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where}: text holds an invalid character {text[exc.start]!r} (a lone surrogate)"
        ) from None
    return text


def parse_label(value: Any, label_names: list[str] | None) -> int | None:
    """An integer class from a label cell: an int, an integral number, a digit string or a label name;
    None for anything else (booleans, fractions, infinities, other strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        stripped = value.strip()
        if label_names and stripped in label_names:
            return label_names.index(stripped)
        if re.fullmatch(r"-?\d{1,9}", stripped):
            return int(stripped)
    return None


def clean_text(text: str) -> str:
    """Turn HTML line breaks into newlines and squeeze runs of spaces."""
    text = _BR.sub("\n", text)
    text = _SPACES.sub(" ", text)
    return text.strip()


SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SPLIT_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet", ".csv")


@dataclass(frozen=True)
class HubDataset:
    """Where a short name lives on the Hugging Face hub, and the splits it has there."""

    repo: str
    config: str | None
    splits: tuple[str, ...]


HUB_DATASETS: dict[str, HubDataset] = {
    "imdb": HubDataset("stanfordnlp/imdb", None, ("train", "test", "unsupervised")),
    "tweeteval_sentiment": HubDataset("cardiffnlp/tweet_eval", "sentiment", ("train", "validation", "test")),
}


@dataclass(frozen=True)
class HubSplit:
    """A short name that resolved to the hub: read lazily, so a missing split fails early only offline."""

    name: str
    split: str
    tried: tuple[str, ...] = ()

    @property
    def source(self) -> HubDataset:
        return HUB_DATASETS[self.name]

    def __str__(self) -> str:
        hub = self.source
        return f"hub:{hub.repo}{':' + hub.config if hub.config else ''}:{self.split}"


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """Folder of the full short-named data sets: the recipe's ``data.dir``, else $COMPEFF_DATA_DIR, else
    None (then the packaged sample and the hub are tried)."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("COMPEFF_DATA_DIR")
    return Path(env).expanduser() if env else None


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in SPLIT_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


_noticed: set[str] = set()


def _notice(message: str) -> None:
    """Say once per process that a name was read from a smaller copy than the user may expect."""
    if message not in _noticed:
        _noticed.add(message)
        print(f"note: {message}", file=sys.stderr)


def resolve_source(spec: str, root: str | Path | None = None) -> Path | str | HubSplit:
    """Map a source spec to what will be read: a file or folder, 'hf:NAME[:SPLIT]' as is, or a short
    name ('imdb:test') looked up in the data folder (``root`` / $COMPEFF_DATA_DIR), the packaged
    sample, then the Hugging Face hub; the error names every place that was tried."""
    if spec.startswith("hf:"):
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        return path
    match = _SHORT.match(spec)
    if not match:
        raise DataError(f"data source '{spec}': file not found")
    name, split = match.groups()
    tried: list[str] = []
    folder = data_dir(root)
    if folder is not None:
        found = _split_file(folder / name, split)
        if found is not None:
            return found
        origin = "data.dir" if root else "$COMPEFF_DATA_DIR"
        tried.append(f"{origin}: no {folder / name / split}.jsonl[.gz]/.parquet/.csv")
    else:
        tried.append("no data folder set (data.dir or $COMPEFF_DATA_DIR)")
    found = _split_file(SAMPLE_DIR / name, split)
    if found is not None:
        sizes = _sample_index().get(f"{name}:{split}", {})
        if sizes.get("rows") != sizes.get("official_rows"):
            _notice(
                f"'{spec}' is read from compeff's packaged sample ({sizes.get('rows', '?'):,} of "
                f"{sizes.get('official_rows', '?'):,} rows, stratified; see {SAMPLE_DIR / 'SOURCES.md'}); "
                "set data.dir or $COMPEFF_DATA_DIR to full copies for the whole split"
            )
        return found
    tried.append(
        "packaged sample: " + (f"no split '{split}'" if name in _sample_names() else "no such data set")
    )
    hub = HUB_DATASETS.get(name)
    if hub is None:
        tried.append("hub: unknown short name (hub names: " + ", ".join(sorted(HUB_DATASETS)) + ")")
    elif split not in hub.splits:
        tried.append(f"hub: {hub.repo} has no split '{split}' ({', '.join(hub.splits)})")
    elif _hub_offline():
        tried.append(f"hub: {hub.repo} not tried (HF_HUB_OFFLINE is set)")
    else:
        return HubSplit(name, split, tuple(tried))
    raise DataError(f"data source '{spec}': not found; tried " + "; ".join(tried))


@lru_cache(maxsize=1)
def _sample_index() -> dict[str, dict[str, int]]:
    """Rows of each packaged split and of its official split (written by scripts/build_data_sample.py)."""
    path = SAMPLE_DIR / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _sample_names() -> set[str]:
    return {p.name for p in SAMPLE_DIR.iterdir() if p.is_dir()} if SAMPLE_DIR.is_dir() else set()


def hub_rows(name: str, split: str, dataset: Any) -> Iterator[dict[str, Any]]:
    """compeff's fields (id, text, label) from a hub split of a short-named data set.

    Ids follow the local copies: IMDb ``<split>-<neg|pos|unsup>-<n>`` (n counts within the label, in
    the split's order), TweetEval ``<split>-<row>``. Labels keep the hub's integers, which are
    compeff's label order (IMDb 0 negative, 1 positive, -1 unlabelled; TweetEval 0/1/2 negative,
    neutral, positive)."""
    counts: dict[int, int] = {}
    for index, row in enumerate(dataset):
        label = int(row["label"])
        if name == "imdb":
            tag = {0: "neg", 1: "pos"}.get(label, "unsup")
            n = counts[label] = counts.get(label, -1) + 1
            rid = f"{'unsup' if split == 'unsupervised' else split}-{tag}-{n}"
        else:
            rid = f"{split}-{index}"
        yield {"id": rid, "text": row["text"], "label": label}


def _load_hub_split(hub_split: HubSplit) -> Any:
    from datasets import load_dataset

    hub = hub_split.source
    try:
        return load_dataset(hub.repo, hub.config, split=hub_split.split)
    except Exception as exc:  # no network, no such repo, an auth wall: all one answer to the user
        tried = "; ".join((*hub_split.tried, f"hub: {hub.repo} ({type(exc).__name__}: {exc})"))
        raise DataError(
            f"data source '{hub_split.name}:{hub_split.split}': not found; tried {tried}"
        ) from None


def source_inputs(specs: list[str], root: str | Path | None = None) -> dict[str, Path | str]:
    """What each source spec reads, for a stage's input fingerprints: a changed file reruns the stage."""
    return {
        f"data:{spec}": (r if isinstance(r := resolve_source(spec, root), Path) else str(r)) for spec in specs
    }


def dataset_name(spec: str) -> str | None:
    """The short data-set name of a spec ('imdb:test' -> 'imdb'), if it has one."""
    match = _SHORT.match(spec)
    return match.group(1) if match else None


@dataclass
class LoadReport:
    """What a load kept and what it skipped (with file:line reasons)."""

    source: str
    kept: int = 0
    problems: list[str] = field(default_factory=list)

    def add_problem(self, msg: str) -> None:
        self.problems.append(msg)


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a byte-order mark (Excel's CSVs) is not part of the first field's name
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return path.open(encoding="utf-8-sig")


def _iter_json_lines(
    path: Path, lines: io.TextIOBase
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{lineno}", None, f"invalid JSON ({exc.msg})"
            continue
        if not isinstance(row, dict):
            yield f"{path}:{lineno}", None, "not a JSON object"
            continue
        yield f"{path}:{lineno}", row, None


def _iter_rows(
    source: str, resolved: Path | str | HubSplit
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Yield (location, row or None, problem) for every row of a source."""
    if isinstance(resolved, HubSplit):
        for i, row in enumerate(hub_rows(resolved.name, resolved.split, _load_hub_split(resolved))):
            yield f"{source}[{i}]", row, None
        return
    if isinstance(resolved, str):  # hf:NAME[:SPLIT]
        from datasets import load_dataset

        parts = resolved.split(":")
        ds = load_dataset(parts[1], split=parts[2] if len(parts) > 2 else "train")
        for i, row in enumerate(ds):
            yield f"{source}[{i}]", dict(row), None
        return
    if resolved.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(resolved))
        if hasattr(ds, "keys"):
            raise DataError(f"{resolved}: a DatasetDict; name one split folder")
        for i, row in enumerate(ds):
            yield f"{resolved}[{i}]", dict(row), None
        return
    name = resolved.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(resolved).to_pylist()):
            yield f"{resolved}[{i}]", row, None
        return
    if name.endswith((".csv", ".csv.gz")):
        with _open_text(resolved) as fh:
            for i, row in enumerate(csv.DictReader(fh), 2):
                yield f"{resolved}:{i}", row, None
        return
    if name.endswith((".json", ".json.gz")):
        with _open_text(resolved) as fh:
            content = fh.read()
        if content.lstrip().startswith("["):
            try:
                rows = json.loads(content)
            except json.JSONDecodeError as exc:
                raise DataError(f"{resolved}:{exc.lineno}: invalid JSON ({exc.msg})") from None
            for i, row in enumerate(rows):
                ok = isinstance(row, dict)
                yield f"{resolved}[{i}]", row if ok else None, None if ok else "not a JSON object"
            return
        yield from _iter_json_lines(resolved, io.StringIO(content))
        return
    if name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(resolved) as fh:
            yield from _iter_json_lines(resolved, fh)
        return
    raise DataError(
        f"{resolved}: unsupported format (use .jsonl[.gz], .json, .parquet, .csv or a saved dataset)"
    )


def load_records(
    spec: str,
    text_field: str = "text",
    label_field: str | None = None,
    limit: int | None = None,
    root: str | Path | None = None,
    label_names: list[str] | None = None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Load rows with a non-empty text (and a valid label, if asked): records get id, text, source."""
    resolved = resolve_source(spec, root)
    try:
        return _load_records(spec, resolved, text_field, label_field, limit, label_names)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{resolved}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} of a block); "
            "save the file as UTF-8"
        ) from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{resolved}: unreadable ({exc})") from None


def _load_records(
    spec: str,
    resolved: Path | str | HubSplit,
    text_field: str,
    label_field: str | None,
    limit: int | None,
    label_names: list[str] | None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    report = LoadReport(source=spec)
    records: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}
    for index, (where, row, problem) in enumerate(_iter_rows(spec, resolved)):
        if problem:
            report.add_problem(f"{where}: {problem}")
            continue
        assert row is not None
        text = row.get(text_field)
        if not isinstance(text, str):
            report.add_problem(
                f"{where}: field '{text_field}' is {'missing' if text is None else type(text).__name__}, not text"
            )
            continue
        text = clean_text(check_text(where, text))
        if not text:
            report.add_problem(f"{where}: empty text")
            continue
        rid = row.get("id")
        record: dict[str, Any] = {
            **row,
            "id": str(rid)
            if rid is not None
            else f"{dataset_name(spec) or Path(str(resolved)).stem}-{index}",
            "text": text,
            "source": spec,
        }
        if record["id"] in first_seen:
            raise DataError(
                f"{where}: id {record['id']!r} appears twice (first at {first_seen[record['id']]})"
            )
        first_seen[record["id"]] = where
        if label_field:
            label = parse_label(row.get(label_field), label_names)
            if label is None:  # a labelled set with a broken label is a broken file: no silent skip
                raise DataError(
                    f"{where}: label '{label_field}' = {row.get(label_field)!r} is not an integer class"
                    + (f" or one of {label_names}" if label_names else "")
                )
            if not label_names and not 0 <= label < MAX_CLASSES:
                raise DataError(
                    f"{where}: label {label} is outside 0..{MAX_CLASSES - 1}; give label names "
                    "(eval.label_names) or check the label field"
                )
            record["label"] = label
        records.append(record)
        if limit and len(records) >= limit:
            break
    report.kept = len(records)
    return records, report


def load_texts(spec: str, text_field: str = "text", limit: int | None = None, root: str | Path | None = None):
    """User texts for synthesis (labels, if any, are kept but not required)."""
    return load_records(spec, text_field=text_field, limit=limit, root=root)


def load_labelled(
    spec: str,
    text_field: str = "text",
    label_field: str = "label",
    label_names: list[str] | None = None,
    limit: int | None = None,
    root: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[str], LoadReport]:
    """A labelled set: records with integer labels, the label names, and the load report."""
    names = label_names or LABEL_NAMES.get(dataset_name(spec) or "")
    records, report = load_records(
        spec, text_field=text_field, label_field=label_field, limit=limit, root=root, label_names=names
    )
    if names is None:
        names = [str(i) for i in range(max((r["label"] for r in records), default=-1) + 1)]
    bad = [r for r in records if not 0 <= r["label"] < len(names)]
    for r in bad:
        report.add_problem(f"{spec}: id {r['id']}: label {r['label']} outside 0..{len(names) - 1}")
    records = [r for r in records if 0 <= r["label"] < len(names)]
    report.kept = len(records)
    return records, list(names), report


def select_user_texts(
    sources: list[str],
    n_texts: int,
    seed: int = 42,
    text_field: str = "text",
    root: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[LoadReport]]:
    """A seeded sample of ``n_texts`` user texts stratified over sources (domains).

    Each source gets an equal share; a source with fewer texts gives its unused share to the others.
    Ids are prefixed by the source's short name so they stay unique across sources.
    """
    import random

    rng = random.Random(seed)
    pools: list[list[dict[str, Any]]] = []
    reports = []
    owner: dict[str, str] = {}
    for spec in sources:
        records, report = load_texts(spec, text_field=text_field, root=root)
        prefix = dataset_name(spec) or Path(spec).name.split(".")[0]
        for r in records:
            r["text_id"] = r["id"]
            r["id"] = f"{prefix}:{r['id']}"
            if owner.setdefault(r["id"], spec) != spec:
                raise DataError(
                    f"data.user_texts: '{owner[r['id']]}' and '{spec}' both give the text id '{r['id']}' "
                    "(ids are <file name>:<id>); rename one file or give its rows other ids"
                )
        pools.append(records)
        reports.append(report)
    quotas = [0] * len(pools)
    remaining = n_texts
    open_sources = [i for i, pool in enumerate(pools) if pool]
    while remaining > 0 and open_sources:
        share = max(1, remaining // len(open_sources))
        for i in list(open_sources):
            take = min(share, len(pools[i]) - quotas[i], remaining)
            quotas[i] += take
            remaining -= take
            if quotas[i] >= len(pools[i]):
                open_sources.remove(i)
            if remaining == 0:
                break
    chosen: list[dict[str, Any]] = []
    for pool, quota in zip(pools, quotas):
        chosen.extend(rng.sample(pool, quota))
    return chosen, reports
