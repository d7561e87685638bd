"""Run folders: one helper that every stage uses for its bookkeeping.

``runs/<name>/<stage>/`` holds ``data.jsonl`` (one record a line, each with a stable ``id``),
``failures.jsonl`` (every item that did not succeed, with the reason) and ``manifest.json``
(config slice, input fingerprints, counts, timings, library versions).

Records are appended batch by batch with one ``write`` + ``fsync``, so a killed process loses at most
the batch in flight; a torn last line is cut off when the stage is opened again. Opening a stage
that already has records resumes it: ``done_ids`` tells the stage what to skip.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from compeff import top_logprobs
from compeff.data import DataError
from compeff.fingerprints import fingerprint_obj, fingerprint_path, weights_fingerprint
from compeff.progress import console

__all__ = ["fingerprint_obj", "fingerprint_path", "weights_fingerprint"]

try:  # POSIX: one process per stage folder
    import fcntl
except ImportError:  # pragma: no cover - Windows: no stage lock
    fcntl = None  # type: ignore[assignment]

DATA_FILE = "data.jsonl"
FAILURES_FILE = "failures.jsonl"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class StageError(DataError):
    """A stage folder cannot be used as asked (a bad name, a foreign folder, unreadable records)."""


class StageLocked(StageError):
    """Another live process holds the stage folder's lock."""


def input_fingerprints(inputs: dict[str, str | Path] | None) -> dict[str, str]:
    """What a stage's manifest records of its inputs: a file's or folder's fingerprint, else the value."""
    return {k: fingerprint_path(v) if Path(v).exists() else str(v) for k, v in (inputs or {}).items()}


def check_plain_name(name: str, what: str = "name") -> str:
    """A run, stage or model name that is safe to join into a path: [A-Za-z0-9._-]+, not '.' or '..'."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name in (".", ".."):
        raise StageError(f"{what} {name!r}: use letters, digits, '.', '_' and '-' only (not '.' or '..')")
    return name


def stage_folder(run_dir: str | Path, name: str) -> Path:
    """``run_dir/name`` for a plain stage name, checked to resolve inside the run folder (no symlink out)."""
    check_plain_name(name, "stage name")
    run_dir = Path(run_dir)
    folder = run_dir / name
    root = run_dir.resolve()
    real = folder.resolve()
    if real == root or not real.is_relative_to(root):
        raise StageError(f"stage folder {folder} resolves to {real}, outside its run folder {root}")
    return folder


def is_stage_folder(folder: Path) -> bool:
    """True when ``folder`` is a compeff stage folder: it has a manifest, or holds nothing but a lock
    and nested stage folders (a stage whose phases ran before its own manifest was written)."""
    if (folder / MANIFEST_FILE).is_file():
        return True
    for child in folder.iterdir():
        if child.name == LOCK_FILE or child.name.endswith(".tmp"):
            continue
        if not (child.is_dir() and not child.is_symlink() and is_stage_folder(child)):
            return False
    return True


def clear_stage_folder(folder: Path) -> None:
    """Remove a stage folder's contents (not its lock); refuse a folder compeff did not make."""
    if not folder.exists():
        return
    if folder.is_symlink() or not folder.is_dir() or not is_stage_folder(folder):
        raise StageError(
            f"{folder}: not a compeff stage folder (no {MANIFEST_FILE}); not removing it. "
            "Move it away or choose another stage name"
        )
    for child in folder.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def take_stage_lock(folder: Path) -> int | None:
    """An exclusive lock on a stage folder for this process (released on close or at any exit, so a
    dead holder never blocks); a second process gets :class:`StageLocked` naming the holder's pid."""
    if fcntl is None:  # pragma: no cover
        return None
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StageLocked(
            f"{folder}: in use by another compeff process (pid {_lock_holder(path)}); "
            "wait for it to finish or stop it"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release_stage_lock(fd: int | None) -> None:
    """Release a lock taken by :func:`take_stage_lock` (closing the descriptor drops it)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class StageConflict(StageError):
    """A stage folder holds work made from other settings or inputs; ``--force`` starts it over.

    ``changed`` names the config keys and inputs that differ."""

    def __init__(self, message: str, changed: list[str] | None = None):
        super().__init__(message)
        self.changed = changed or []


_SERVERS: list[dict[str, Any]] | None = None


def note_servers(servers: list[dict[str, Any]] | None) -> None:
    """Record the teacher servers compeff runs now (command lines, versions), for every manifest
    written while they run; None when they stop."""
    global _SERVERS
    _SERVERS = servers


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


def _decode_record(path: Path, lineno: int, line: bytes) -> dict[str, Any]:
    """One stage record from a jsonl line: a JSON object with an id, or a StageError naming file:line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StageError(
            f"{path}:{lineno}: not UTF-8 (byte {exc.start}); the file was changed outside compeff"
        ) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StageError(
            f"{path}:{lineno}: invalid JSON ({exc.msg}); the file was changed outside compeff"
        ) from None
    if not isinstance(record, dict) or record.get("id") is None:
        raise StageError(
            f"{path}:{lineno}: not a JSON object with an 'id'; the file was changed outside compeff"
        )
    return record


def _repair_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a stage's jsonl file; only a torn last line (no newline: the write a kill interrupted) is
    cut off. A bad line anywhere else is not compeff's and stops the stage with file:line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict[str, Any]] = []
    pos = 0
    lineno = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        if nl == -1:
            break  # no newline: torn write
        lineno += 1
        line = raw[pos:nl]
        if line.strip():
            records.append(_decode_record(path, lineno, line))
        pos = nl + 1
    if pos != len(raw):
        with path.open("r+b") as fh:
            fh.truncate(pos)
            fh.flush()
            os.fsync(fh.fileno())
    return records


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a jsonl file; a line that is not UTF-8, not JSON or not an object raises
    :class:`StageError` naming file and line."""
    with Path(path).open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise StageError(f"{path}:{lineno}: not UTF-8 (byte {exc.start})") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise StageError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise StageError(f"{path}:{lineno}: not a JSON object ({type(row).__name__})")
            yield row


def read_chat_set(path: Path, need: tuple[str, ...] = ("messages",)) -> list[dict[str, Any]]:
    """Records of a chat jsonl, each checked for an id and the ``need``-ed keys (errors name the line)."""
    if not path.is_file():
        raise DataError(f"{path}: not found")
    rows = []
    for lineno, row in enumerate(iter_jsonl(path), 1):
        missing = [k for k in ("id", *need) if k not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: record without {', '.join(repr(k) for k in missing)}")
        rows.append(row)
    return rows


def _file_contains(path: Path, needle: bytes) -> bool:
    """Whether a file's bytes contain ``needle`` (memory-mapped: a multi-GB file is not read into memory)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return mapped.find(needle) != -1


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold ``<target>.lock`` while building ``target``: a second process (another rank, another run)
    waits here and then finds the finished copy instead of building it again. The lock dies with its
    holder, so a killed build never blocks the next one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(target.parent / f"{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"another process is building {target.name}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace a file's bytes in one step, durable once this returns (written, fsynced, renamed)."""
    import tempfile

    # a temp name of its own: two processes writing the same file never share or remove each other's
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a file's text in one step (a reader never sees half a file)."""
    atomic_write_bytes(path, text.encode("utf-8"))


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
    failed_ids: set[str] = field(default_factory=set)  # ids with a line in failures.jsonl when opened
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
    _lock: int | None = None
    _running: bool = False  # a "running" manifest was written: close() writes the final one

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

        The folder is locked for this process until :meth:`close`. ``writer=False`` (the non-zero ranks of
        a distributed job) reads the folder but never writes or locks it.
        """
        folder = stage_folder(run_dir, name)
        input_prints = input_fingerprints(inputs)
        fp = fingerprint_obj({"stage": name, "config": config, "inputs": input_prints})
        lock = None
        if writer:
            if folder.exists() and (
                folder.is_symlink() or not folder.is_dir() or not is_stage_folder(folder)
            ):
                raise StageError(
                    f"{folder}: holds files but no compeff {MANIFEST_FILE} (a manual delete or an interrupted "
                    "--force?); compeff will not adopt or remove them. Move the folder away and run again"
                )
            folder.mkdir(parents=True, exist_ok=True)
            lock = take_stage_lock(folder)
        try:
            if force and writer:
                clear_stage_folder(folder)
            stage = cls._open_locked(folder, name, config, input_prints, fp, writer)
        except BaseException:
            release_stage_lock(lock)
            raise
        stage._lock = lock
        return stage

    @classmethod
    def _open_locked(
        cls,
        folder: Path,
        name: str,
        config: dict[str, Any],
        input_prints: dict[str, str],
        fp: str,
        writer: bool,
    ) -> Stage:
        old = read_manifest(folder)
        previous_status = old.get("status") if old else None
        if old is not None and old.get("fingerprint") != fp:
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
            failures = _repair_jsonl(folder / FAILURES_FILE)
        else:
            records = failures = []
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
        stage.failed_ids = {str(r["id"]) for r in failures}
        stage.n_ok = stage.resumed_from = len(stage.done_ids)
        stage.n_failed = len(stage.failed_ids - stage.done_ids)  # failed, and no record since
        if stage.was_complete:  # up to date: left exactly as it is unless the stage writes again
            stage.n_failed = int((old or {}).get("counts", {}).get("failed", stage.n_failed))
        else:
            stage._mark_running()
        return stage

    def _mark_running(self) -> None:
        if not self._running:
            self._running = True
            self._write_manifest(status="running")

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
            "servers",
        }
        for key, value in (self.previous_manifest or {}).items():
            if key not in standard:
                self.extra.setdefault(key, value)

    # ---------------------------------------------------------------- writing
    def _write_lines(self, fh_attr: str, path: Path, records: Iterable[dict[str, Any]]) -> int:
        lines = [dumps_line(r) for r in records]
        if not lines or not self.writer:
            return len(lines)
        self._mark_running()
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
        self.n_failed -= sum(1 for r in batch if str(r["id"]) in self.failed_ids)  # a retry that worked
        return n

    def fail(self, records: Iterable[dict[str, Any]]) -> int:
        """Record failed items (``id`` and ``reason`` at least); they are retried when the stage resumes.
        An id already in this folder's failures is not written again (a retry that fails once more)."""
        batch = []
        for record in records:
            if "id" not in record or "reason" not in record:
                raise ValueError(f"{self.name}: a failure needs 'id' and 'reason'")
            rid = str(record["id"])
            if rid in self.failed_ids:
                continue
            self.failed_ids.add(rid)
            batch.append({**record, "time": round(time.time(), 3)})
        n = self._write_lines("_fail_fh", self.failures_path, batch)
        self.n_failed += n
        return n

    def write_artifact(self, filename: str, content: str | bytes | Any) -> Path:
        """Write a side file (report, JSON, plot bytes) atomically into the stage folder."""
        path = self.folder / check_plain_name(filename, "artifact name")
        if not self.writer:
            return path
        self._mark_running()
        if isinstance(content, str):
            content = content.encode("utf-8")
        elif not isinstance(content, bytes):
            content = (json.dumps(content, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        atomic_write_bytes(path, content)
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
            "argv": redact_argv(sys.argv),
            **({"servers": _SERVERS} if _SERVERS else {}),
            **self.extra,
        }
        if self.writer:
            _atomic_write_json(self.manifest_path, manifest)
        return manifest

    def close(self, complete: bool = True) -> dict[str, Any]:
        """Flush files and write the final manifest; ``complete`` False marks an interrupted stage."""
        try:
            for attr in ("_data_fh", "_fail_fh"):
                fh = getattr(self, attr)
                if fh is not None:
                    fh.close()
                    setattr(self, attr, None)
            if self._running and complete and self.writer:
                self._export_top_logprobs()
            if self._running or not complete:
                self.manifest = self._write_manifest(status="complete" if complete else "interrupted")
            else:  # an up-to-date stage that wrote nothing: its manifest stays exactly as it was
                self.manifest = dict(self.previous_manifest or {})
        finally:
            release_stage_lock(self._lock)
            self._lock = None
        return self.manifest

    def _export_top_logprobs(self) -> None:
        """Records carrying the teacher's top-k log-probabilities get their columnar copy beside
        ``data.jsonl`` (:func:`compeff.top_logprobs.write_parquet`), described in the manifest."""
        marker = f'"{top_logprobs.FIELD}"'.encode()
        path = self.folder / top_logprobs.PARQUET_FILE
        if not _file_contains(self.data_path, marker):
            path.unlink(missing_ok=True)
            return
        info = top_logprobs.write_parquet(iter_jsonl(self.data_path), path)
        if info:
            self.extra["top_logprobs"] = info

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)


def upstream_data(run_dir: Path, explicit: str | None, stage: str, what: str, key: str) -> Path:
    """A stage's input: the explicit file when the recipe names one (``key``), else ``stage``'s data
    file in the run folder, which must exist."""
    if explicit:
        return Path(explicit)
    path = run_dir / stage / DATA_FILE
    if not path.is_file():
        raise DataError(f"{path}: no {what} (run `compeff {stage}` first or set {key})")
    return path


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with credentials inside URLs (``http://user:pass@host``) replaced by ``***``."""
    return [_URL_CREDENTIALS.sub(r"\g<scheme>***@", arg) for arg in argv]


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a stage folder, or None if the stage never ran; an unreadable one is a StageError."""
    path = Path(stage_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or "fingerprint" not in manifest:
        raise StageError(
            f"{path}: not a compeff manifest (empty or damaged); move the stage folder away or rerun with --force"
        )
    return manifest
