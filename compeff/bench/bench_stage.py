"""The ``bench`` stage of ``compeff run``: time the run's distilled encoders (``compeff bench encoders``).

Writes ``runs/<name>/bench/``: ``encoders_bench.{md,csv,json}``, one Pareto plot per batch size and the
manifest. A finished bench is not timed again for the same models and settings; timings are not
resumable half-way (a killed bench starts over, it is minutes of work).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from compeff.config import Recipe
from compeff.data import DataError
from compeff.progress import console
from compeff.runs import Stage
from compeff.train.kd_stage import TEACHER_DIR


def default_models(recipe: Recipe) -> list[Path]:
    """The run's kd teacher and its students trained with the kd loss (first seed; every student if none)."""
    run_dir = recipe.run_dir
    teacher = Path(recipe.kd.teacher) if recipe.kd.teacher else run_dir / TEACHER_DIR
    students_dir = run_dir / "kd" / "students"
    if not (teacher / "config.json").exists() or not students_dir.is_dir():
        raise DataError(
            f"{run_dir}: no distilled encoders to benchmark (run the kd stage first or set bench.models)"
        )
    seed = recipe.kd.seeds[0]
    students = sorted(
        p for p in students_dir.iterdir() if (p / "config.json").exists() and p.name.endswith(f"-kd-{seed}")
    )
    if not students:
        students = sorted(p for p in students_dir.iterdir() if (p / "config.json").exists())
    return [teacher, *students]


def run_bench_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Benchmark the recipe's encoders on CPU (and CUDA where present) into the run's bench folder."""
    from compeff.bench.encoders import run_encoder_bench

    b = recipe.bench
    models = [Path(m) for m in b.models] if b.models else default_models(recipe)
    for model in models:
        if not (model / "config.json").exists():
            raise DataError(f"bench.models: {model} is not a classifier folder (no config.json)")
    test_set = b.test_set or recipe.kd.test_set
    train_set = b.train_set or recipe.kd.train_set
    config = {"bench": b.model_dump(), "test_set": test_set, "train_set": train_set}
    inputs = {
        f"model:{m.name}": m / "model.safetensors" for m in models if (m / "model.safetensors").exists()
    }
    stage = Stage.open(recipe.run_dir, "bench", config=config, inputs=inputs, force=force)
    with stage:
        if stage.was_complete and (stage.folder / "encoders_bench.json").exists():
            console.print(f"bench: up to date ({stage.folder})")
            stage.keep_previous_extra()
        else:
            rows = run_encoder_bench(
                [str(m) for m in models],
                test_set=test_set,
                train_set=train_set,
                limit=b.limit,
                timed=b.timed,
                batch_sizes=b.batch_sizes,
                threads=b.threads,
                warmup=b.warmup,
                calibration=b.calibration,
                max_length=b.max_length or recipe.kd.max_length,
                backends=b.backends,
                baselines=b.baselines,
                out_dir=stage.folder,
            )
            stage.append({"id": f"{r.model}|{r.backend}|{r.batch_size}", **asdict(r)} for r in rows)
            stage.extra["models"] = {m.name: str(m) for m in models}
    return stage.manifest or {}
