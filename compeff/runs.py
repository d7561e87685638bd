"""Run folders: one helper that every stage uses for its bookkeeping.

``runs/<name>/<stage>/`` holds ``data.jsonl`` (one record a line, each with a stable ``id``),
``failures.jsonl`` (every item that did not succeed, with the reason) and ``manifest.json``
(config slice, input fingerprints, counts, timings, library versions).

Records are appended batch by batch with one ``write`` + ``fsync``, so a killed process loses at most
the batch in flight; a torn last line is cut off when the stage is opened again. Opening a stage
that already has records resumes it: ``done_ids`` tells the stage what to skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

DATA_FILE = "data.jsonl"
FAILURES_FILE = "failures.jsonl"
MANIFEST_FILE = "manifest.json"


class StageConflict(RuntimeError):
    """A stage folder holds work made from other settings or inputs; ``--force`` starts it over.

    ``changed`` names the config keys and inputs that differ."""

    def __init__(self, message: str, changed: list[str] | None = None):
        super().__init__(message)
        self.changed = changed or []


def fingerprint_obj(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def fingerprint_path(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and bytes); a stage folder uses its manifest."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        manifest = path / MANIFEST_FILE
        if manifest.is_file():
            return json.loads(manifest.read_text()).get("fingerprint", "")
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(fingerprint_path(child).encode())
        return digest.hexdigest()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape results, for the manifest."""
    versions = {"python": platform.python_version()}
    for name in (
        "compeff",
        "torch",
        "transformers",
        "tokenizers",
        "datasets",
        "sentence-transformers",
        "trl",
        "peft",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def dumps_line(record: dict[str, Any]) -> bytes:
    """One jsonl line (UTF-8, newline-terminated); orjson where installed, it is several times faster."""
    try:
        import orjson
    except ImportError:  # pragma: no cover
        return (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    return orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)


def _repair_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a jsonl file, cutting off a torn last line (the batch a kill interrupted)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict[str, Any]] = []
    good_end = 0
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        if nl == -1:
            break  # no newline: torn write
        line = raw[pos:nl]
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        pos = nl + 1
        good_end = pos
    if good_end != len(raw):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return records


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a jsonl file; a bad line raises ValueError naming file and line."""
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a file's text in one step (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


@dataclass
class Stage:
    """Bookkeeping of one stage of one run: resume, appends, failures, manifest.

    Use as a context manager::

        with Stage.open(run_dir, "enumerate", config=cfg.model_dump(), inputs={"texts": path}) as st:
            todo = [r for r in items if r["id"] not in st.done_ids]
            ...
            st.append(records); st.fail(failed)
    """

    folder: Path
    name: str
    config: dict[str, Any]
    inputs: dict[str, str]
    fingerprint: str
    done_ids: set[str] = field(default_factory=set)
    n_ok: int = 0
    n_failed: int = 0
    resumed_from: int = 0
    previous_status: str | None = None
    previous_manifest: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    writer: bool = True  # False: a follower process of a distributed job, which writes nothing
    _started: float = field(default_factory=time.time)
    _data_fh: Any = None
    _fail_fh: Any = None

    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        name: str,
        config: dict[str, Any],
        inputs: dict[str, str | Path] | None = None,
        force: bool = False,
        writer: bool = True,
    ) -> Stage:
        """Open (create or resume) ``run_dir/name``; refuse to mix work made from other settings.

        ``writer=False`` (the non-zero ranks of a distributed job) reads the folder but never writes it.
        """
        folder = Path(run_dir) / name
        input_prints = {
            k: fingerprint_path(v) if Path(v).exists() else str(v) for k, v in (inputs or {}).items()
        }
        fp = fingerprint_obj({"stage": name, "config": config, "inputs": input_prints})
        if force and folder.exists() and writer:
            shutil.rmtree(folder)
        if writer:
            folder.mkdir(parents=True, exist_ok=True)
        manifest_path = folder / MANIFEST_FILE
        previous_status = None
        old: dict[str, Any] | None = None
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            previous_status = old.get("status")
            if old.get("fingerprint") != fp:
                changed = sorted(
                    k
                    for k in set(old.get("config", {})) | set(config)
                    if old.get("config", {}).get(k) != config.get(k)
                )
                changed += sorted(k for k in input_prints if old.get("inputs", {}).get(k) != input_prints[k])
                raise StageConflict(
                    f"{folder}: made with other settings or inputs (changed: {', '.join(changed) or 'unknown'}); "
                    "rerun with --force to start this stage over",
                    changed,
                )
        if writer:
            (folder / DATA_FILE).touch(exist_ok=True)  # the data file exists even when nothing succeeds
            records = _repair_jsonl(folder / DATA_FILE)
            _repair_jsonl(folder / FAILURES_FILE)
        else:
            records = []
        stage = cls(
            folder=folder,
            name=name,
            config=config,
            inputs=input_prints,
            fingerprint=fp,
            previous_status=previous_status,
            previous_manifest=old,
            writer=writer,
        )
        stage.done_ids = {str(r["id"]) for r in records}
        stage.n_ok = stage.resumed_from = len(stage.done_ids)
        stage._write_manifest(status="running")
        return stage

    # ---------------------------------------------------------------- state
    @property
    def data_path(self) -> Path:
        return self.folder / DATA_FILE

    @property
    def failures_path(self) -> Path:
        return self.folder / FAILURES_FILE

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_FILE

    @property
    def was_complete(self) -> bool:
        """True when an earlier run of this exact stage (same fingerprint) finished."""
        return self.previous_status == "complete"

    def pending(self, items: list[Any], key: Callable[[Any], str] = lambda item: item.id) -> list[Any]:
        """Items still to do: none when an earlier run of this exact stage completed (its failures stand
        until ``--force``); otherwise those without a record yet (earlier failures are tried again)."""
        if self.was_complete:
            return []
        return [item for item in items if str(key(item)) not in self.done_ids]

    def keep_previous_extra(self) -> None:
        """Carry a finished run's stage-specific manifest fields over (when a stage is up to date)."""
        standard = {
            "stage",
            "status",
            "fingerprint",
            "config",
            "inputs",
            "counts",
            "timings",
            "versions",
            "argv",
        }
        for key, value in (self.previous_manifest or {}).items():
            if key not in standard:
                self.extra.setdefault(key, value)

    # ---------------------------------------------------------------- writing
    def _write_lines(self, fh_attr: str, path: Path, records: Iterable[dict[str, Any]]) -> int:
        lines = [dumps_line(r) for r in records]
        if not lines or not self.writer:
            return len(lines)
        fh = getattr(self, fh_attr)
        if fh is None:
            fh = path.open("ab")
            setattr(self, fh_attr, fh)
        fh.write(b"".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
        return len(lines)

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append finished records (each with an ``id`` not written before) in one flushed write."""
        batch = []
        for record in records:
            rid = record.get("id")
            if rid is None:
                raise ValueError(f"{self.name}: every record needs an 'id'")
            rid = str(rid)
            if rid in self.done_ids:
                continue
            self.done_ids.add(rid)
            batch.append(record)
        n = self._write_lines("_data_fh", self.data_path, batch)
        self.n_ok += n
        return n

    def fail(self, records: Iterable[dict[str, Any]]) -> int:
        """Record failed items (``id`` and ``reason`` at least); they are retried when the stage resumes."""
        batch = []
        for record in records:
            if "id" not in record or "reason" not in record:
                raise ValueError(f"{self.name}: a failure needs 'id' and 'reason'")
            batch.append({**record, "time": round(time.time(), 3)})
        n = self._write_lines("_fail_fh", self.failures_path, batch)
        self.n_failed += n
        return n

    def write_artifact(self, filename: str, content: str | bytes | Any) -> Path:
        """Write a side file (report, JSON, plot bytes) atomically into the stage folder."""
        path = self.folder / filename
        if not self.writer:
            return path
        tmp = path.with_name(path.name + ".tmp")
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_text(
                json.dumps(content, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
            )
        os.replace(tmp, path)
        return path

    def _write_manifest(self, status: str) -> dict[str, Any]:
        manifest = {
            "stage": self.name,
            "status": status,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self.inputs,
            "counts": {"ok": self.n_ok, "failed": self.n_failed, "resumed_from": self.resumed_from},
            "timings": {
                "started": self._started,
                "seconds": round(time.time() - self._started, 3),
            },
            "versions": library_versions(),
            "argv": sys.argv,
            **self.extra,
        }
        if self.writer:
            _atomic_write_json(self.manifest_path, manifest)
        return manifest

    def close(self, complete: bool = True) -> dict[str, Any]:
        """Flush files and write the final manifest; ``complete`` False marks an interrupted stage."""
        for attr in ("_data_fh", "_fail_fh"):
            fh = getattr(self, attr)
            if fh is not None:
                fh.close()
                setattr(self, attr, None)
        self.manifest = self._write_manifest(status="complete" if complete else "interrupted")
        return self.manifest

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)


def upstream_data(run_dir: Path, explicit: str | None, stage: str, what: str, key: str) -> Path:
    """A stage's input: the explicit file when the recipe names one (``key``), else ``stage``'s data
    file in the run folder, which must exist."""
    from compeff.data import DataError

    if explicit:
        return Path(explicit)
    path = run_dir / stage / DATA_FILE
    if not path.is_file():
        raise DataError(f"{path}: no {what} (run `compeff {stage}` first or set {key})")
    return path


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a stage folder, or None if the stage never ran."""
    path = Path(stage_dir) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.exists() else None
