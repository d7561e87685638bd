"""``compeff cluster``: attributes -> analytical perspectives.

Writes ``cluster/data.jsonl`` (one record per attribute with its perspective), ``perspectives.json``
(id, exemplar, members with counts, top-5 descriptions, size), ``perspectives.png`` (2-D projection
coloured by perspective) and ``summary.md``. A run that did not converge says so everywhere.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from compeff.config import Recipe
from compeff.data import DataError
from compeff.embeddings import embed_texts
from compeff.progress import console
from compeff.runs import Stage, iter_jsonl
from compeff.synth.enumerate import attributes_path
from compeff.synth.perspectives import APResult, cluster_attributes


def read_attributes(path: Path) -> list[dict[str, Any]]:
    """attributes.jsonl rows (name, description, count); a bad row raises DataError naming its line."""
    if not path.is_file():
        raise DataError(
            f"{path}: no attributes to cluster (run `compeff enumerate` first or set cluster.input)"
        )
    rows = []
    for lineno, row in enumerate(iter_jsonl(path), 1):
        if not isinstance(row.get("name"), str) or not isinstance(row.get("count"), int):
            raise DataError(f"{path}:{lineno}: needs 'name' (text) and 'count' (integer)")
        rows.append(row)
    return rows


def build_perspectives(attributes: list[dict[str, Any]], result: APResult) -> list[dict[str, Any]]:
    """Perspectives sorted by total count: exemplar, members (by count), top-5 descriptions, size."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(result.labels):
        groups[int(label)].append(i)
    perspectives = []
    for label, members in groups.items():
        members.sort(key=lambda i: (-attributes[i]["count"], attributes[i]["name"]))
        exemplar_idx = next((int(e) for e in result.exemplars if result.labels[e] == label), members[0])
        perspectives.append(
            {
                "label": label,
                "exemplar": attributes[exemplar_idx]["name"],
                "size": len(members),
                "total_count": int(sum(attributes[i]["count"] for i in members)),
                "members": [
                    {"name": attributes[i]["name"], "count": attributes[i]["count"]} for i in members
                ],
                "top_descriptions": [
                    attributes[i].get("description", "")
                    for i in members[:5]
                    if attributes[i].get("description")
                ],
            }
        )
    perspectives.sort(key=lambda p: (-p["total_count"], p["exemplar"]))
    for pid, p in enumerate(perspectives):
        p["id"] = pid
        del p["label"]
    return perspectives


def plot_perspectives(
    embeddings: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    counts: list[int],
    exemplars: list[int],
    path: Path,
) -> None:
    """Scatter of a 2-D PCA projection, one colour per perspective, size by log count, exemplars named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    fig, ax = plt.subplots(figsize=(9, 7), dpi=110)
    if len(names) >= 2:
        xy = PCA(n_components=2, random_state=0).fit_transform(embeddings)
    else:
        xy = np.zeros((len(names), 2))
    sizes = 12 + 18 * np.log1p(np.asarray(counts, dtype=float))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab20", s=sizes, alpha=0.75, edgecolors="none")
    for i in sorted(exemplars, key=lambda i: -counts[i])[:25]:
        ax.annotate(names[i], xy[i], fontsize=7, alpha=0.9)
    ax.set_title(f"{len(names)} attributes in {len(np.unique(labels))} perspectives (PCA of embeddings)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_markdown(perspectives: list[dict[str, Any]], result: APResult, n_attributes: int) -> str:
    """Short report: number of perspectives, the largest ones, singletons, convergence."""
    singletons = [p["exemplar"] for p in perspectives if p["size"] == 1]
    lines = [
        "# Perspectives",
        "",
        f"- attributes: {n_attributes}",
        f"- perspectives: {len(perspectives)}",
        f"- singletons: {len(singletons)}",
        f"- preference: {result.preference:.4f} "
        + (
            f"(percentile {result.extra['percentile']})"
            if result.extra.get("percentile") is not None
            else f"(searched: {len(result.extra.get('search', []))} runs)"
        ),
        f"- iterations: {result.n_iter}, converged: {'yes' if result.converged else '**NO** (results may be unstable)'}",
        "",
        "| id | exemplar | size | total count | members (top 6) |",
        "|---:|---|---:|---:|---|",
    ]
    for p in perspectives[:20]:
        members = ", ".join(m["name"] for m in p["members"][:6])
        lines.append(f"| {p['id']} | {p['exemplar']} | {p['size']} | {p['total_count']} | {members} |")
    if singletons:
        lines += ["", f"Singletons: {', '.join(singletons[:40])}{' ...' if len(singletons) > 40 else ''}"]
    return "\n".join(lines) + "\n"


def run_cluster_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Embed attribute names, cluster them into perspectives, write the stage's artifacts."""
    settings = recipe.cluster
    source = attributes_path(recipe)
    attributes = read_attributes(source)
    config = {
        "cluster": settings.model_dump(exclude={"input"}),
        "embedder": recipe.embedder.model_dump(),
        "seed": recipe.run.seed,
    }
    stage = Stage.open(recipe.run_dir, "cluster", config=config, inputs={"attributes": source}, force=force)
    with stage:
        if stage.was_complete and (stage.folder / "perspectives.json").exists():
            console.print(f"cluster: up to date ({stage.folder})")
            stage.keep_previous_extra()
        elif not attributes:
            stage.write_artifact("perspectives.json", [])
            stage.write_artifact(
                "summary.md",
                "# Perspectives\n\nNo attribute reached the minimum count; nothing to cluster.\n",
            )
            stage.extra["result"] = {"perspectives": 0, "attributes": 0}
            console.print("[yellow]cluster: no attributes to cluster[/yellow]")
        else:
            names = [a["name"] for a in attributes]
            counts = [a["count"] for a in attributes]
            embeddings = embed_texts(names, recipe.embedder)
            result = cluster_attributes(
                embeddings,
                counts,
                damping=settings.damping,
                max_iter=settings.max_iter,
                preference_percentile=settings.preference_percentile,
                method=settings.method,
                n_clusters_hint=settings.n_perspectives_hint,
                seed=recipe.run.seed,
            )
            perspectives = build_perspectives(attributes, result)
            pid_of = {m["name"]: p["id"] for p in perspectives for m in p["members"]}
            exemplar_of = {m["name"]: p["exemplar"] for p in perspectives for m in p["members"]}
            stage.append(
                {
                    "id": a["name"],
                    "perspective": pid_of[a["name"]],
                    "exemplar": exemplar_of[a["name"]],
                    "count": a["count"],
                }
                for a in attributes
            )
            stage.write_artifact("perspectives.json", perspectives)
            stage.write_artifact("summary.md", summary_markdown(perspectives, result, len(attributes)))
            exemplar_idx = [names.index(p["exemplar"]) for p in perspectives]
            plot_perspectives(
                embeddings, result.labels, names, counts, exemplar_idx, stage.folder / "perspectives.png"
            )
            stage.extra["result"] = {
                "attributes": len(attributes),
                "perspectives": len(perspectives),
                "singletons": sum(p["size"] == 1 for p in perspectives),
                "converged": result.converged,
                "iterations": result.n_iter,
                "preference": result.preference,
                "percentile": result.extra.get("percentile"),
                "method": settings.method,
            }
            if not result.converged:
                console.print(
                    f"[yellow]warning: affinity propagation did not converge in {settings.max_iter} iterations; "
                    "raise cluster.max_iter or cluster.damping[/yellow]"
                )
            console.print(
                f"cluster: {len(attributes)} attributes -> {len(perspectives)} perspectives -> {stage.folder}"
            )
    assert stage.manifest is not None
    return stage.manifest
