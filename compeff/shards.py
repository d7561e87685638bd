"""``--shard K/N`` work splitting shared by the stages that support it (generate, score).

A shard ``K/N`` of stage ``S`` writes ``S-shard-K-of-N/``; ``--merge`` checks that every shard of
one split is complete and made with the same settings, then joins them into ``S/``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from compeff.data import DataError
from compeff.runs import Stage, input_fingerprints, iter_jsonl, read_manifest


def shard_of(sample_id: str, n_shards: int) -> int:
    """Stable shard of a sample id (the same on every machine)."""
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) % n_shards


def parse_shard(spec: str) -> tuple[int, int]:
    """'K/N' -> (K, N)."""
    k, n = spec.split("/")
    return int(k), int(n)


def shard_stage_name(stage: str, spec: str) -> str:
    """Folder name of one shard of a stage."""
    k, n = parse_shard(spec)
    return f"{stage}-shard-{k}-of-{n}"


def finished_shards(run_dir: Path, stage: str) -> list[Path]:
    """The shard folders of ``stage``, checked to form one complete split made with one config."""
    shards = sorted(run_dir.glob(f"{stage}-shard-*-of-*"))
    if not shards:
        raise DataError(f"{run_dir}: no {stage} shards to merge (run `compeff {stage} --shard K/N`)")
    totals = {int(p.name.rsplit("-of-", 1)[1]) for p in shards}
    if len(totals) != 1:
        raise DataError(
            f"{run_dir}: {stage} shards of different splits ({sorted(totals)}); remove the stale ones"
        )
    n = totals.pop()
    expected = {f"{stage}-shard-{k}-of-{n}" for k in range(n)}
    missing = sorted(expected - {p.name for p in shards})
    unfinished = sorted(p.name for p in shards if (read_manifest(p) or {}).get("status") != "complete")
    if missing or unfinished:
        raise DataError(
            f"cannot merge: missing shards {missing or '-'}, unfinished shards {unfinished or '-'}"
        )
    configs = {json.dumps((read_manifest(p) or {}).get("config"), sort_keys=True) for p in shards}
    if len(configs) != 1:
        raise DataError(f"cannot merge: the {stage} shards were made with different settings")
    return shards


def check_shards_match(shards: list[Path], config: dict[str, Any], inputs: dict[str, str | Path]) -> None:
    """Refuse to merge shards made from other settings or inputs than the merge's own (the recipe and
    the input files as they are now), naming the first shard and the keys that differ."""
    prints = input_fingerprints(inputs)
    for shard in shards:
        manifest = read_manifest(shard) or {}
        made, used = manifest.get("config") or {}, manifest.get("inputs") or {}
        changed = sorted(k for k in set(made) | set(config) if made.get(k) != config.get(k))
        changed += sorted(k for k in prints if used.get(k) != prints[k])
        if changed:
            raise DataError(
                f"cannot merge: {shard.name} was made with other settings or inputs than this recipe "
                f"(changed: {', '.join(changed)}); rerun that shard or fix the recipe"
            )


def merge_shard_records(stage: Stage, shards: list[Path]) -> int:
    """Join the shards' records (in id order) and failures (each failed id once, none that succeeded)
    into the merged ``stage`` (checked first with :func:`check_shards_match`). A complete merge is left
    as it is. Returns the number of records added."""
    if stage.was_complete:
        return 0
    rows = sorted((r for p in shards for r in iter_jsonl(p / "data.jsonl")), key=lambda r: str(r["id"]))
    added = stage.append(rows)
    seen = stage.done_ids | stage.failed_ids
    failures = []
    for shard in shards:
        path = shard / "failures.jsonl"
        for failure in iter_jsonl(path) if path.exists() else []:
            if str(failure["id"]) not in seen:
                seen.add(str(failure["id"]))
                failures.append(failure)
    stage.fail(failures)
    return added
