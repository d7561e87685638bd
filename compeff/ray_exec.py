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
import warnings
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

#: what the actors' processes see of this one's environment (on a cluster they do not inherit it)
PASSED_ENV = (
    "COMPEFF_HOME",
    "COMPEFF_DATA_DIR",
    "HF_HOME",
    "HF_TOKEN",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)
#: restarts of a dead actor, and retries of the batch it held: a batch that kills its actor every
#: time stops the job after these instead of looping
ACTOR_RESTARTS = 3


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
        address = settings.address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
        if address == "local":  # a Ray of this command's own, even where `ray start` made one
            kwargs["num_cpus"] = settings.local_cpus
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            raise DataError(f"ray.address {address!r}: cannot join the Ray cluster ({exc})") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray


def check_resources(ray: Any, settings: RaySettings) -> None:
    """Refuse an actor that no node of the cluster could hold (Ray Data would wait for it for ever)."""
    total = ray.cluster_resources()
    for key, need in (("CPU", settings.cpus_per_actor), ("GPU", settings.gpus_per_actor)):
        have = float(total.get(key, 0.0))
        if need > have:
            raise DataError(
                f"ray.{key.lower()}s_per_actor {need:g}: the Ray cluster has {have:g} {key}s in all; "
                f"lower it or add nodes"
            )


class PoolWorker:
    """One actor of the pool: builds its work function once, then maps pickled batches through it. An
    actor Ray gave no GPU sees none, so a model on ``device: auto`` cannot land on a GPU that another
    actor holds."""

    def __init__(self, factory: WorkerFactory, factory_kwargs: dict[str, Any]):
        import ray

        if not ray.get_gpu_ids():
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.work = factory(**factory_kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = self.work([pickle.loads(blob) for blob in batch["item"]])
        out = np.empty(len(results), dtype=object)
        out[:] = [pickle.dumps(r) for r in results]
        return {"result": out, "pid": np.full(len(results), os.getpid())}


def new_stats(settings: RaySettings) -> dict[str, Any]:
    """Where a stage's work ran, for its manifest: filled in by :func:`map_on_actors`."""
    return {"kind": "ray", "address": settings.address, "batches": 0, "actor_pids": []}


def map_on_actors(
    items: Sequence[Any],
    factory: WorkerFactory,
    factory_kwargs: dict[str, Any],
    settings: RaySettings,
    env: dict[str, str] | None = None,
    stats: dict[str, Any] | None = None,
) -> Iterator[list[Any]]:
    """Every item through a pool of up to ``ray.actors`` actors, ``ray.batch_size`` items a batch; yields
    each finished batch's results (in completion order) as it comes back. ``factory(**factory_kwargs)``
    runs once per actor, in an environment with ``env`` and this process's :data:`PASSED_ENV`; items and
    results travel pickled. ``stats`` (see :func:`new_stats`) counts the batches and the actors' pids. A
    job that stops (an actor that cannot start, a batch that kept killing its actor) is one line: what
    came back before is the caller's to keep, and the next run resumes after it."""
    if not items:
        return
    ray = connect(settings)
    check_resources(ray, settings)
    blocks = max(1, math.ceil(len(items) / settings.batch_size))
    env_vars = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env_vars.update(env or {})
    dataset = ray.data.from_items([{"item": pickle.dumps(x)} for x in items], override_num_blocks=blocks)
    with warnings.catch_warnings():  # Ray 2.60 names no parameter for an actor's restarts yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        mapped = _map_batches(dataset, ray, factory, factory_kwargs, settings, env_vars, blocks)
    try:
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            if stats is not None:
                stats["batches"] += 1
                stats["actor_pids"] = sorted(set(stats["actor_pids"]).union(int(p) for p in batch["pid"]))
            yield [pickle.loads(blob) for blob in batch["result"]]
    except DataError:
        raise
    except Exception as exc:  # the Ray job stopped: one line, the cause's last line
        last = (str(exc).strip().splitlines() or [""])[-1]
        raise DataError(
            f"run.executor ray: the Ray job stopped ({type(exc).__name__}: {last[:300]}); what came back "
            "before is written: run the command again to resume"
        ) from None


def _map_batches(
    dataset: Any,
    ray: Any,
    factory: WorkerFactory,
    factory_kwargs: dict[str, Any],
    settings: RaySettings,
    env_vars: dict[str, str],
    blocks: int,
) -> Any:
    """The dataset mapped through the pool of :class:`PoolWorker` actors (lazy: nothing runs yet)."""
    return dataset.map_batches(
        PoolWorker,
        fn_constructor_kwargs={"factory": factory, "factory_kwargs": factory_kwargs},
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(settings.actors, blocks)),
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_RESTARTS,
    )
