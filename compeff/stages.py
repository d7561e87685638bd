"""Registry of the pipeline's stages: name -> ``run(recipe, force) -> manifest`` function.

Stages that later work fills in are listed but not yet registered; asking for one raises
:class:`StageNotImplemented` with a clear message instead of doing anything half-way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# The synthesis chain and the encoder chain, in the order `compeff run` executes them.
STAGE_NAMES: tuple[str, ...] = (
    "teach",
    "enumerate",
    "cluster",
    "tasks",
    "generate",
    "score",
    "sample",
    "sft",
    "eval",
    "kd",
    "bench",
)

# name -> "module:function"; a stage appears here once it is implemented.
IMPLEMENTED: dict[str, str] = {
    "teach": "compeff.teaching:run_teach_stage",
    "enumerate": "compeff.synth.enumerate:run_enumerate_stage",
    "cluster": "compeff.synth.cluster:run_cluster_stage",
    "tasks": "compeff.synth.tasks_stage:run_tasks_stage",
    "generate": "compeff.synth.generate:run_generate_stage",
    "score": "compeff.train.score_warmup:run_score_stage",
    "sample": "compeff.select.sample_stage:run_sample_stage",
    "sft": "compeff.train.sft:run_sft_stage",
    "eval": "compeff.evaluate.eval_stage:run_eval_stage",
    "kd": "compeff.train.kd_stage:run_kd_stage",
    "bench": "compeff.bench.bench_stage:run_bench_stage",
}


class StageNotImplemented(NotImplementedError):
    """The stage exists in the design but is not implemented in this version."""


def get_stage(name: str) -> Callable[..., dict[str, Any]]:
    """The run function of a stage, importing its module only now (heavy imports stay lazy)."""
    if name not in STAGE_NAMES:
        raise KeyError(f"unknown stage '{name}' (known: {', '.join(STAGE_NAMES)})")
    target = IMPLEMENTED.get(name)
    if target is None:
        raise StageNotImplemented(f"stage '{name}' is not implemented yet in this version of compeff")
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def implemented_stages() -> list[str]:
    """Implemented stages in pipeline order."""
    return [name for name in STAGE_NAMES if name in IMPLEMENTED]
