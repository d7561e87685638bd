"""A run's report: ``runs/<name>/report.md`` and a self-contained ``report.html`` (plots inlined).

Everything comes from the stage folders (manifests, the markdown summaries each stage writes, its PNG
plots and failures), so ``compeff report RUN_DIR`` rebuilds it at any time, also for a run that stopped.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from compeff.runs import FAILURES_FILE, MANIFEST_FILE, atomic_write_text, iter_jsonl, read_manifest
from compeff.stages import STAGE_NAMES

# The summaries stages write, in the order they are shown.
SUMMARY_FILES = ("summary.md", "report.md", "results.md", "encoders_bench.md")
USAGE_KEYS = ("requests", "ok", "failed", "cached", "retries", "prompt_tokens", "completion_tokens")
HTML_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
code{background:#f5f5f5;padding:0 .2em}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
"""


def teacher_usage(stage_dir: Path) -> dict[str, int]:
    """Teacher requests and tokens of a stage, summed over its manifest and its sub-stages' manifests."""
    total: Counter[str] = Counter()
    for path in sorted(stage_dir.rglob(MANIFEST_FILE)):
        usage = json.loads(path.read_text()).get("teacher_usage") or {}
        total.update({k: int(usage.get(k, 0)) for k in USAGE_KEYS})
    return dict(total)


def failure_reasons(stage_dir: Path, top: int = 5) -> tuple[int, list[tuple[str, int]]]:
    """How many failures a stage kept and its most common reasons (first 100 characters)."""
    path = stage_dir / FAILURES_FILE
    if not path.is_file():
        return 0, []
    reasons = Counter(str(r.get("reason", ""))[:100] for r in iter_jsonl(path))
    return sum(reasons.values()), reasons.most_common(top)


def attributes_table(path: Path, top: int = 15) -> str:
    """The most frequent attributes the enumerate stage kept, as a markdown table."""
    rows = sorted(iter_jsonl(path), key=lambda r: -int(r.get("count", 0)))
    lines = [f"{len(rows)} attributes kept; the {min(top, len(rows))} most frequent:", "",
             "| attribute | count | description |", "|---|---:|---|"]  # fmt: skip
    for r in rows[:top]:
        description = str(r.get("description", "")).replace("|", "/")[:100]
        lines.append(f"| {r.get('name', '')} | {r.get('count', 0)} | {description} |")
    return "\n".join(lines)


def _scalar_facts(manifest: dict[str, Any]) -> str:
    """A stage's own numbers from its manifest (e.g. sft: steps, final loss), for stages without a summary."""
    standard = {"stage", "status", "fingerprint", "config", "inputs", "counts", "timings", "versions", "argv"}
    facts = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in manifest.items()
             if k not in standard and isinstance(v, (int, float, str)) and not isinstance(v, bool)]  # fmt: skip
    return "; ".join(facts) + "." if facts else ""


def _demote(markdown: str) -> str:
    """Push a stage summary's headings two levels down, under the report's stage heading."""
    return re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + 2) + " ", markdown, flags=re.M)


def _outcomes_from_manifests(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for name in STAGE_NAMES:
        manifest = read_manifest(run_dir / name)
        if manifest is None:
            continue
        counts = manifest.get("counts", {})
        rows.append({"stage": name, "action": manifest.get("status", "?"), "reason": "", "ok": counts.get("ok", 0),
                     "failed": counts.get("failed", 0), "seconds": manifest.get("timings", {}).get("seconds", 0)})  # fmt: skip
    return rows


def report_markdown(run_dir: Path, outcomes: list[dict[str, Any]] | None = None, title: str = "") -> str:
    """The report as markdown; images are linked relative to the run folder."""
    run_dir = Path(run_dir)
    outcomes = outcomes or _outcomes_from_manifests(run_dir)
    lines = [f"# compeff run: {title or run_dir.name}", "", f"Run folder `{run_dir}`, report written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}.", ""]  # fmt: skip
    stage_dirs = [run_dir / n for n in STAGE_NAMES if (run_dir / n / MANIFEST_FILE).is_file()]
    usages = {d.name: teacher_usage(d) for d in stage_dirs}
    usage: Counter[str] = Counter()
    for u in usages.values():
        usage.update(u)
    manifests = {d.name: read_manifest(d) or {} for d in stage_dirs}
    lines += ["## Stages", "", "| stage | status | this run | ok | failed | seconds (stage) | teacher tokens |",
              "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    done = {o["stage"]: o for o in outcomes}
    for d in stage_dirs:
        m = manifests[d.name]
        o = done.get(d.name, {})
        u = usages[d.name]
        tokens = u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)
        counts = m.get("counts", {})
        this_run = f"{o['action']} ({o['reason']})" if o.get("reason") else o.get("action", "-")
        lines.append(f"| {d.name} | {m.get('status', '?')} | {this_run} | {counts.get('ok', 0)} | "
                     f"{counts.get('failed', 0)} | {m.get('timings', {}).get('seconds', 0):.1f} | {tokens:,} |")  # fmt: skip
    total_s = sum(m.get("timings", {}).get("seconds", 0) for m in manifests.values())
    lines += ["", f"Stage time in total: {total_s / 60:.1f} min. Teacher: {usage.get('requests', 0):,} requests "
              f"({usage.get('cached', 0):,} from the cache, {usage.get('failed', 0):,} failed, "
              f"{usage.get('retries', 0):,} retries), {usage.get('prompt_tokens', 0):,} prompt and "
              f"{usage.get('completion_tokens', 0):,} completion tokens.", ""]  # fmt: skip
    for d in stage_dirs:
        lines += [f"## {d.name}", ""]
        if (d / "attributes.jsonl").is_file():
            lines += [attributes_table(d / "attributes.jsonl"), ""]
        summaries = [d / f for f in SUMMARY_FILES if (d / f).is_file()]
        for path in summaries:
            lines += [_demote(path.read_text(encoding="utf-8").strip()), ""]
        if not summaries:
            lines += [_scalar_facts(manifests[d.name]), ""]
        for png in sorted(d.glob("*.png")):
            lines += [f"![{d.name}: {png.stem}]({d.name}/{png.name})", ""]
        n_failed, reasons = failure_reasons(d)
        if n_failed:
            lines += [f"Failures kept in `{d.name}/{FAILURES_FILE}`: {n_failed}. Most common reasons:", ""]
            lines += [f"- {count} x `{reason.replace(chr(96), chr(39))}`" for reason, count in reasons]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def report_html(markdown: str, run_dir: Path, title: str) -> str:
    """The markdown report as one HTML file with every plot inlined (no other file needed to view it).

    The report quotes untrusted text (user texts, teacher answers): raw HTML in it is escaped, never
    rendered, and only PNG files inside the run folder are inlined; any other image is dropped."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    root = Path(run_dir).resolve()

    def inline(match: re.Match[str]) -> str:
        src = html.unescape(match.group(1))
        path = (root / src).resolve()
        if (
            src.startswith(("/", "\\"))
            or not path.is_relative_to(root)
            or path.suffix != ".png"
            or not path.is_file()
        ):
            return 'src=""'
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]*)"', inline, body)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n{body}</body></html>\n")  # fmt: skip


def write_report(run_dir: Path, recipe: Any = None, outcomes: list[dict[str, Any]] | None = None) -> Path:
    """Write ``report.md`` and ``report.html`` into the run folder (atomically); returns the markdown path."""
    run_dir = Path(run_dir)
    title = recipe.run.name if recipe is not None else run_dir.name
    markdown = report_markdown(run_dir, outcomes, title)
    html = report_html(markdown, run_dir, f"compeff run: {title}")
    atomic_write_text(run_dir / "report.md", markdown)
    atomic_write_text(run_dir / "report.html", html)
    return run_dir / "report.md"
