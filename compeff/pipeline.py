"""``compeff run``: a recipe's stages in order, each skipped, resumed or rerun as its manifest says.

A stage whose manifest is complete for the same settings and inputs is skipped (its function opens the
stage, sees the matching fingerprint and returns at once); one that was interrupted resumes from its
records; one whose settings or inputs changed starts over, and so does every later stage of its chain
(the synthesis chain enumerate ... eval, the encoder chain kd, bench). After every stage the run's
report is written again, so a run stopped half-way still has an up-to-date ``report.md``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from rich.table import Table

from compeff import progress
from compeff.config import Recipe
from compeff.runs import StageConflict, read_manifest
from compeff.stages import get_stage, implemented_stages

# Stages whose outputs feed the next ones: a rerun of one reruns the later ones of its chain.
CHAINS: tuple[tuple[str, ...], ...] = (
    ("teach",),
    ("enumerate", "cluster", "tasks", "generate", "score", "sample", "sft", "eval"),
    ("kd", "bench"),
)


@dataclass
class StageOutcome:
    """What ``compeff run`` did with one stage."""

    stage: str
    action: str  # ran | resumed | skipped | rerun
    reason: str
    ok: int
    failed: int
    seconds: float


def chain_of(stage: str) -> tuple[str, ...]:
    """The chain a stage belongs to."""
    for chain in CHAINS:
        if stage in chain:
            return chain
    return (stage,)


def _action(before: dict[str, Any] | None, after: dict[str, Any], forced: bool) -> tuple[str, str]:
    if forced:
        return ("rerun", "forced") if before else ("ran", "new")
    if before is None:
        return "ran", "new"
    if before.get("status") == "complete" and before.get("fingerprint") == after.get("fingerprint"):
        return "skipped", "up to date"
    return "resumed", f"was {before.get('status', 'unknown')}"


def run_pipeline(
    recipe: Recipe, stages: list[str] | None = None, force: bool = False, show: bool = True
) -> list[StageOutcome]:
    """Run ``stages`` (default: the recipe's run.stages, else every stage) and write the run's report."""
    from compeff.report import write_report

    names = stages or recipe.run.stages or implemented_stages()
    for name in names:
        get_stage(name)  # an unknown or missing stage fails before any work
    outcomes: list[StageOutcome] = []
    dirty: set[str] = set()  # chains with a stage rerun in this run: their later stages start over too
    run_dir = recipe.run_dir
    for index, name in enumerate(names, 1):
        chain = chain_of(name)
        forced = force or any(c in dirty for c in chain[: chain.index(name)])
        before = read_manifest(run_dir / name)
        progress.console.rule(f"[bold][{index}/{len(names)}] {name}")
        started = time.monotonic()
        reason = ""
        with progress.stage_prefix(f"[{index}/{len(names)}] "):
            try:
                manifest = get_stage(name)(recipe, force=forced)
            except StageConflict as exc:
                reason = ", ".join(exc.changed) or "unknown"
                progress.console.print(
                    f"[yellow]{name}: settings or inputs changed ({reason}): starting it over"
                    + (", with the later stages of its chain" if chain.index(name) < len(chain) - 1 else "")
                )
                forced = True
                manifest = get_stage(name)(recipe, force=True)
        if forced:
            dirty.add(name)
        manifest = read_manifest(run_dir / name) or manifest  # what the stage left on disk
        action, why = _action(before, manifest, forced)
        counts = manifest.get("counts", {})
        outcome = StageOutcome(
            stage=name,
            action=action,
            reason=f"changed: {reason}" if reason else why,
            ok=int(counts.get("ok", 0)),
            failed=int(counts.get("failed", 0)),
            seconds=round(time.monotonic() - started, 2),
        )
        outcomes.append(outcome)
        progress.console.print(
            f"{name}: {outcome.action} ({outcome.reason}); {outcome.ok} ok, {outcome.failed} failed, "
            f"{outcome.seconds:.1f} s"
        )
        write_report(run_dir, recipe, [asdict(o) for o in outcomes])
    if show:
        progress.console.print(outcome_table(outcomes))
    return outcomes


def outcome_table(outcomes: list[StageOutcome]) -> Table:
    """A rich table of what the run did, stage by stage."""
    table = Table(title="compeff run")
    for column in ("stage", "action", "reason", "ok", "failed", "seconds"):
        table.add_column(column, justify="right" if column in ("ok", "failed", "seconds") else "left")
    for o in outcomes:
        table.add_row(o.stage, o.action, o.reason, str(o.ok), str(o.failed), f"{o.seconds:.1f}")
    return table
