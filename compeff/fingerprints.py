"""Fingerprints of what a stage reads: objects, files, folders and model weights.

A stage's manifest stores them so that a changed input, not only a changed setting, reruns the stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".onnx",
    ".json",
    ".model",
    ".txt",
    ".jinja",
)
_EDGE = 1 << 20  # bytes hashed at each end of a large weights file


def fingerprint_obj(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def fingerprint_path(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and bytes); a stage folder uses its manifest."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            return json.loads(manifest.read_text()).get("fingerprint", "")
        files = (
            p for p in path.rglob("*") if p.is_file() and p.name != ".lock" and not p.name.endswith(".tmp")
        )
        for child in sorted(files):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(fingerprint_path(child).encode())
        return digest.hexdigest()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_summary(path: Path) -> str:
    """sha256 of a file's size and bytes; a file over 8 MB contributes its size and first and last MB
    (weights files are large and rewritten whole, so the edges and the size change with them)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        if size <= 8 * _EDGE:
            digest.update(fh.read())
        else:
            digest.update(fh.read(_EDGE))
            fh.seek(size - _EDGE)
            digest.update(fh.read(_EDGE))
    return digest.hexdigest()


def _is_card(name: str) -> bool:
    return name.startswith("compeff_") and name.endswith(".json")


def weights_fingerprint(name_or_path: str | Path) -> str:
    """Identity of a model: for a local file or folder, a sha256 over its weight, config and tokenizer
    files (names, sizes, contents or their edges); for a hub id or served name, the name itself. compeff's
    own cards (``compeff_*.json``: how, where and how long a copy was made) are left out, so a model
    rebuilt to the same weights, or moved with ``$COMPEFF_HOME``, keeps its identity."""
    path = Path(str(name_or_path)).expanduser()
    if not path.exists():
        return str(name_or_path)
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) and not _is_card(p.name)
        )
    )
    digest = hashlib.sha256()
    for child in files:
        digest.update(str(child.relative_to(path) if path.is_dir() else child.name).encode())
        digest.update(_file_summary(child).encode())
    return f"{path.name}@{digest.hexdigest()[:16]}"
