"""Difficulty before the teacher answers: a regressor from the prompt to rho.

Scoring needs the teacher's response, so the teacher must answer every pair first (the paper's third
open problem). The proxy learns rho from what is known before answering - a sentence embedding of
the prompt (instruction + text), the prompt's length and the task type - on already-scored samples,
so ``compeff generate`` can skip the pairs it predicts easiest (``generate.proxy``).

``compeff score --proxy`` trains it on the run's scored set, reports its Spearman correlation with
the true rho on held-out samples, and how many teacher calls skipping would have saved while the
retained set stays as hard (hard selection of ``sample.ratio``, mean rho within 1% of scoring all).
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compeff.config import EmbedderSettings, Recipe
from compeff.data import DataError
from compeff.progress import console
from compeff.runs import Stage, iter_jsonl, read_manifest

PROXY_FILE = "proxy.joblib"
TASK_TYPES = (
    "closed_classification",
    "open_classification",
    "rating",
    "extraction",
    "structured",
    "analysis",
)
SKIP_GRID = tuple(round(0.05 * i, 2) for i in range(0, 19))
TOLERANCE = 0.01


def prompt_of(messages: list[dict[str, Any]]) -> str:
    """Everything the teacher sees: the messages before its answer."""
    turns = messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages
    return "\n\n".join(str(m.get("content", "")) for m in turns)


def proxy_features(
    prompts: Sequence[str], task_types: Sequence[str | None], settings: EmbedderSettings, embedder: Any = None
) -> np.ndarray:
    """Embedding of each prompt, its log length in characters, and a one-hot of its task type."""
    from compeff.embeddings import embed_texts

    emb = embed_texts(list(prompts), settings, embedder)
    length = np.log1p(np.array([len(p) for p in prompts], dtype=np.float32))[:, None]
    onehot = np.array([[t == k for k in TASK_TYPES] for t in task_types], dtype=np.float32)
    return np.hstack([emb, length, onehot])


def make_regressor(head: str, seed: int):
    """Ridge with its penalty chosen by cross-validation, or a small MLP."""
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if head == "ridge":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    return make_pipeline(
        StandardScaler(),
        MLPRegressor(
            hidden_layer_sizes=(128,), alpha=1e-3, early_stopping=True, max_iter=500, random_state=seed
        ),
    )


def calls_saved(
    truth: np.ndarray,
    predicted: np.ndarray,
    ratio: float,
    tolerance: float = TOLERANCE,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Teacher calls skippable at (nearly) equal retained difficulty.

    Skipping a share s of pairs (those predicted easiest, or random ones as a baseline) leaves the
    rest to be answered, scored and hard-selected down to ``ratio`` of all pairs (within each group
    when ``groups`` is given, as per-task sampling does); the largest s whose retained mean rho stays
    within ``tolerance`` of selecting from every pair is the saving.
    """
    if groups is None:
        groups = np.zeros(truth.size, dtype=int)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    random_order = {i: rng.permutation(m) for i, m in enumerate(members)}

    def retained_mean(skip: float, how: str) -> float | None:
        kept = []
        for i, m in enumerate(members):
            keep_n = max(1, round(ratio * m.size))
            answered_n = m.size - round(skip * m.size)
            if answered_n < keep_n:
                return None
            order = m[np.argsort(-predicted[m], kind="stable")] if how == "proxy" else random_order[i]
            kept.append(np.sort(truth[order[:answered_n]])[-keep_n:])
        return float(np.concatenate(kept).mean())

    oracle = retained_mean(0.0, "proxy")
    curve = []
    for skip in SKIP_GRID:
        row = {"skip": skip, "proxy": retained_mean(skip, "proxy"), "random": retained_mean(skip, "random")}
        if row["proxy"] is None:
            break
        curve.append(row)

    def best(name: str) -> float:
        ok = [r["skip"] for r in curve if r[name] >= (1 - tolerance) * oracle]
        return max(ok, default=0.0)

    return {
        "ratio": ratio,
        "tolerance": tolerance,
        "grouped": bool(np.unique(groups).size > 1),
        "oracle_mean_rho": oracle,
        "saved_share_proxy": best("proxy"),
        "saved_share_random": best("random"),
        "curve": curve,
    }


def run_proxy(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, test and save the proxy on the run's scored set (``runs/<name>/score-proxy/``)."""
    import joblib
    from scipy.stats import spearmanr

    settings = recipe.score
    scored = recipe.run_dir / "score" / "data.jsonl"
    if not scored.is_file():
        raise DataError(f"{scored}: no scored set to learn from (run `compeff score` first)")
    rows = [r for r in iter_jsonl(scored) if isinstance(r.get("difficulty", {}).get("rank"), int | float)]
    if len(rows) < 20:
        raise DataError(f"{scored}: {len(rows)} samples with a rank score; the proxy needs at least 20")
    config = {
        "head": settings.proxy_head,
        "holdout": settings.proxy_holdout,
        "seed": recipe.run.seed,
        "embedder": recipe.embedder.model_dump(exclude={"device", "batch_size"}),
        "ratio": recipe.sample.ratio,
    }
    stage = Stage.open(recipe.run_dir, "score-proxy", config=config, inputs={"scored": scored}, force=force)
    with stage:
        if stage.was_complete and (stage.folder / PROXY_FILE).exists():
            return stage.previous_manifest.get("report", {}) if stage.previous_manifest else {}
        rows.sort(key=lambda r: str(r["id"]))
        console.print(f"score-proxy: embedding {len(rows)} prompts with {recipe.embedder.model}")
        X = proxy_features(
            [prompt_of(r["messages"]) for r in rows], [r.get("task_type") for r in rows], recipe.embedder
        )
        y = np.array([float(r["difficulty"]["rank"]) for r in rows])
        rng = np.random.default_rng(recipe.run.seed)
        test = np.zeros(len(rows), dtype=bool)
        test[rng.permutation(len(rows))[: max(5, round(settings.proxy_holdout * len(rows)))]] = True
        model = make_regressor(settings.proxy_head, recipe.run.seed).fit(X[~test], y[~test])
        predicted = model.predict(X[test])
        rho_s = spearmanr(y[test], predicted)[0] if np.ptp(y[test]) > 0 and np.ptp(predicted) > 0 else 0.0
        types = np.array([str(r.get("task_type")) for r in rows])[test]
        within = {}
        for kind in sorted(set(types)):
            sel = types == kind
            if sel.sum() >= 10 and np.ptp(y[test][sel]) > 0 and np.ptp(predicted[sel]) > 0:
                within[kind] = float(spearmanr(y[test][sel], predicted[sel])[0])
        report = {
            "spearman_within_task_type": within,
            "train": int((~test).sum()),
            "heldout": int(test.sum()),
            "head": settings.proxy_head,
            "spearman_heldout": float(rho_s),
            "savings": calls_saved(y[test], predicted, recipe.sample.ratio, seed=recipe.run.seed),
            "savings_per_task": calls_saved(
                y[test],
                predicted,
                recipe.sample.ratio,
                seed=recipe.run.seed,
                groups=np.unique([str(r.get("task_id")) for r in rows], return_inverse=True)[1][test],
            ),
        }
        stage.append(
            {"id": r["id"], "rho": float(t), "predicted": float(p)}
            for r, t, p in zip(
                [r for r, m in zip(rows, test, strict=True) if m], y[test], predicted, strict=True
            )
        )
        final = make_regressor(settings.proxy_head, recipe.run.seed).fit(X, y)  # every sample for use
        buffer = io.BytesIO()
        joblib.dump({"model": final, "embedder": recipe.embedder.model_dump(), "task_types": TASK_TYPES},
                    buffer)  # fmt: skip
        stage.write_artifact(PROXY_FILE, buffer.getvalue())  # atomic: never half a pickle
        stage.extra["proxy_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
        stage.write_artifact("report.json", report)
        stage.write_artifact("report.md", proxy_markdown(report))
        stage.extra["report"] = report
        s = report["savings"]
        console.print(
            f"score-proxy: Spearman {rho_s:.3f} on {report['heldout']} held-out samples; skipping "
            f"{s['saved_share_proxy']:.0%} of teacher calls keeps the retained set within "
            f"{s['tolerance']:.0%} of its difficulty (random skipping: {s['saved_share_random']:.0%})"
        )
    return report


def proxy_markdown(report: dict[str, Any]) -> str:
    s = report["savings"]
    lines = [
        "# Difficulty proxy",
        "",
        f"- {report['head']} head trained on {report['train']} scored samples, tested on {report['heldout']}",
        f"- Spearman correlation with the true rho (held out): {report['spearman_heldout']:.3f}; within each "
        "task type: "
        + (", ".join(f"{k} {v:.3f}" for k, v in report["spearman_within_task_type"].items()) or "-"),
        f"- teacher calls saved at equal retained difficulty (hard selection of {s['ratio']:.0%}, mean rho "
        f"within {s['tolerance']:.0%} of scoring everything): {s['saved_share_proxy']:.0%} "
        f"(random skipping: {s['saved_share_random']:.0%})",
        f"- the same with selection within each task (sample.group: task): "
        f"{report['savings_per_task']['saved_share_proxy']:.0%} "
        f"(random skipping: {report['savings_per_task']['saved_share_random']:.0%})",
        "",
        "| skipped | retained mean rho, proxy | retained mean rho, random |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['skip']:.0%} | {r['proxy']:.4f} | {r['random']:.4f} |" for r in s["curve"]]
    lines.append(f"\nScoring every pair: retained mean rho {s['oracle_mean_rho']:.4f}.")
    return "\n".join(lines) + "\n"


def load_proxy(path: str | Path) -> dict[str, Any]:
    """A saved proxy (a proxy.joblib file or the score-proxy folder holding it).

    A joblib file is a pickle, which runs code when loaded: only a proxy that compeff wrote is loaded,
    i.e. one inside a completed score-proxy stage folder whose manifest records the file's sha256."""
    import joblib

    path = Path(path)
    if path.is_dir():
        path = path / PROXY_FILE
    if not path.is_file():
        raise DataError(f"{path}: no difficulty proxy (train one with `compeff score --proxy`)")
    manifest = read_manifest(path.parent) or {}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if manifest.get("status") != "complete" or manifest.get("proxy_sha256") != digest:
        raise DataError(
            f"{path}: not a proxy written by `compeff score --proxy` (its stage manifest does not record this "
            "file); compeff loads no other pickle"
        )
    return joblib.load(path)


def skip_predicted_easy(
    items: Sequence[Any], prompts: Sequence[str], task_ids: Sequence[str], task_types: Sequence[str | None],
    proxy: dict[str, Any], skip: float,
) -> tuple[list[Any], list[float]]:  # fmt: skip
    """The items left after dropping, within each task, the ``skip`` share predicted easiest; and
    every item's predicted rho."""
    settings = EmbedderSettings(**proxy["embedder"])
    predicted = proxy["model"].predict(proxy_features(prompts, task_types, settings))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(task_ids):
        groups[task].append(i)
    dropped: set[int] = set()
    for members in groups.values():
        order = sorted(members, key=lambda i: (predicted[i], i))
        dropped.update(order[: round(skip * len(members))])
    return [item for i, item in enumerate(items) if i not in dropped], [float(p) for p in predicted]
