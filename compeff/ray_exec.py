"""``run.executor: ray``: a stage's per-item work on Ray Data actor pools, results streamed back here.

Ray schedules; compeff keeps its bookkeeping. The items still to do are made a Ray dataset, mapped
through a pool of actors (each builds its model or client once, in its constructor), and every batch
an actor finishes comes back to this process, which alone writes the stage folder through
:class:`compeff.runs.Stage`. So resume and exactly-once are the stage's own: a killed driver takes its
job's actors with it, and the next run skips every id already written; a lost worker's batch is
re-run by Ray and only its first result is written. Ray is imported only here, and only when asked for.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from compeff.config import RaySettings
from compeff.data import DataError
from compeff.progress import console

#: the Ray minor version compeff is tested with (``compeff[ray]`` pins it)
TESTED_RAY = "2.60"
INSTALL_HINT = "pip install 'compeff[ray]'"

#: builds, inside an actor, the function that turns a list of items into a list of results
WorkerFactory = Callable[..., Callable[[list[Any]], list[Any]]]


def import_ray() -> Any:
    """The ``ray`` module, or one clear line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data ships in the 'ray[data]' extra
    except ImportError as exc:
        raise DataError(
            f"run.executor ray needs Ray Data in this environment ({exc}): {INSTALL_HINT}"
        ) from None
    return ray


def connect(settings: RaySettings) -> Any:
    """Join the cluster ``ray.address`` names ($RAY_ADDRESS when null), or start a local Ray for this
    command; an unreachable cluster is one line (exit 2). Ray Data's own progress bars are turned off:
    the stage shows compeff's."""
    ray = import_ray()
    if not ray.__version__.startswith(TESTED_RAY + "."):
        console.print(f"[yellow]ray {ray.__version__}: compeff is tested with Ray {TESTED_RAY}.x[/yellow]")
    if not ray.is_initialized():
        address = settings.address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
        if address is None:
            kwargs["num_cpus"] = settings.local_cpus
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            raise DataError(f"ray.address {address!r}: cannot join the Ray cluster ({exc})") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray


class PoolWorker:
    """One actor of the pool: builds its work function once, then maps pickled batches through it."""

    def __init__(self, factory: WorkerFactory, factory_kwargs: dict[str, Any]):
        self.work = factory(**factory_kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = self.work([pickle.loads(blob) for blob in batch["item"]])
        out = np.empty(len(results), dtype=object)
        out[:] = [pickle.dumps(r) for r in results]
        return {"result": out}


def map_on_actors(
    items: Sequence[Any],
    factory: WorkerFactory,
    factory_kwargs: dict[str, Any],
    settings: RaySettings,
) -> Iterator[list[Any]]:
    """Every item through a pool of ``ray.actors`` actors, ``ray.batch_size`` items a batch; yields each
    finished batch's results (in completion order) as it comes back. ``factory(**factory_kwargs)`` runs
    once per actor; items and results travel pickled between this process and the actors."""
    if not items:
        return
    ray = connect(settings)
    blocks = max(1, math.ceil(len(items) / settings.batch_size))
    dataset = ray.data.from_items([{"item": pickle.dumps(x)} for x in items], override_num_blocks=blocks)
    mapped = dataset.map_batches(
        PoolWorker,
        fn_constructor_kwargs={"factory": factory, "factory_kwargs": factory_kwargs},
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=settings.actors),
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor,
    )
    for batch in mapped.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        yield [pickle.loads(blob) for blob in batch["result"]]
