"""The ``compeff`` command line: parse flags, load the recipe, call one function. Nothing else.

Each stage command's flags are derived from the pydantic settings of its recipe section, so the help
text and defaults are written once (in :mod:`compeff.config`).
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Optional, Union

import typer
from pydantic import BaseModel

from compeff.config import ConfigError, Recipe, load_recipe
from compeff.data import DataError
from compeff.runs import StageConflict
from compeff.stages import StageNotImplemented, get_stage
from compeff.teachers.base import TeacherUnavailable

app = typer.Typer(
    help="compeff: distil large language models into small, fast sentiment-analysis students.\n\n"
    "Every command reads a YAML recipe (--config) with --set key.path=value overrides; flags win over both.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: the teacher client, encoder students.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

EXIT_USAGE = 2
EXIT_NOT_IMPLEMENTED = 3


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print an error on stderr and return the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def guarded(fn: Callable[[], Any]) -> Any:
    """Run a command body, turning known errors into one clear message and a non-zero exit."""
    try:
        return fn()
    except (ConfigError, DataError, TeacherUnavailable) as exc:
        raise fail(str(exc)) from None
    except StageConflict as exc:
        raise fail(str(exc)) from None
    except StageNotImplemented as exc:
        raise fail(str(exc), EXIT_NOT_IMPLEMENTED) from None


# -------------------------------------------------------------------- flags derived from settings
def _plain_type(annotation: Any) -> tuple[type | None, bool, list[str] | None]:
    """(click-friendly type, is_list, choices) of a pydantic field annotation; None type = no flag."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _plain_type(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _plain_type(args[0])
        return None, False, None
    if origin is Literal:
        return str, False, [str(a) for a in typing.get_args(annotation)]
    if origin is list:
        inner, _, choices = _plain_type(typing.get_args(annotation)[0])
        return (inner, True, choices) if inner is str else (None, False, None)
    if annotation in (int, float, str, bool):
        return annotation, False, None
    return None, False, None


def settings_options(
    section: str, model: type[BaseModel], prefix: str = ""
) -> list[tuple[str, inspect.Parameter]]:
    """Typer parameters for the scalar fields of one recipe section, with the field help and default."""
    params = []
    for field_name, info in model.model_fields.items():
        kind, is_list, choices = _plain_type(info.annotation)
        if kind is None:
            continue
        flag = "--" + (prefix + field_name).replace("_", "-")
        default = info.get_default(call_default_factory=True)
        help_text = (info.description or "") + (f" Choices: {', '.join(choices)}." if choices else "")
        help_text += f" Default: {default!r}. Recipe key: {section}.{field_name}."
        py_name = f"{section}__{field_name}"
        if kind is bool:
            option = typer.Option(
                None,
                f"{flag}/--no-{(prefix + field_name).replace('_', '-')}",
                help=help_text,
                show_default=False,
            )
            annotation: Any = Optional[bool]
        elif is_list:
            option = typer.Option(
                None, flag, help=help_text + " Repeat the flag for several.", show_default=False
            )
            annotation = Optional[list[str]]
        else:
            option = typer.Option(None, flag, help=help_text, show_default=False)
            annotation = Optional[kind]
        params.append(
            (
                py_name,
                inspect.Parameter(
                    py_name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
                ),
            )
        )
    return params


def common_options() -> list[tuple[str, inspect.Parameter]]:
    """--config, --set, --run-name, --run-dir, --force: on every stage command."""
    kw = inspect.Parameter.KEYWORD_ONLY
    spec = [
        ("config", Optional[Path], typer.Option(None, "--config", "-c", help="YAML recipe (see recipes/).")),
        (
            "set_",
            Optional[list[str]],
            typer.Option(None, "--set", help="Override a recipe key: --set sample.ratio=0.3 (repeatable)."),
        ),
        (
            "run_name",
            Optional[str],
            typer.Option(None, "--run-name", help="Run folder name (recipe key run.name)."),
        ),
        (
            "run_dir",
            Optional[str],
            typer.Option(None, "--run-dir", help="Folder of run folders (recipe key run.dir)."),
        ),
        (
            "force",
            bool,
            typer.Option(False, "--force", help="Start this stage over, discarding its earlier results."),
        ),
    ]
    return [(name, inspect.Parameter(name, kw, default=opt, annotation=ann)) for name, ann, opt in spec]


def recipe_from_flags(kwargs: dict[str, Any]) -> Recipe:
    """Load the recipe named by --config, apply --set overrides, then explicit flags."""
    extra: dict[str, Any] = {}
    if kwargs.get("run_name"):
        extra["run.name"] = kwargs["run_name"]
    if kwargs.get("run_dir"):
        extra["run.dir"] = kwargs["run_dir"]
    for key, value in kwargs.items():
        if "__" in key and value is not None and value != []:
            section, field_name = key.split("__", 1)
            extra[f"{section}.{field_name}"] = value
    return load_recipe(kwargs.get("config"), kwargs.get("set_") or [], extra)


TEACHER_FLAGS = (
    "backend",
    "model",
    "base_urls",
    "concurrency",
    "timeout_s",
    "temperature",
    "max_tokens",
    "cache",
)


#: the stages whose per-item work can run on Ray (``--executor ray``)
EXECUTOR_STAGES = ("teach", "generate", "score")


def stage_command(name: str, help_text: str, sections: list[str], teacher: bool = False) -> None:
    """Register ``compeff NAME`` with flags for the named recipe sections (and key teacher flags)."""
    params = common_options()
    for section in sections:
        params += settings_options(section, Recipe.model_fields[section].annotation)
    if teacher:
        teacher_params = settings_options(
            "teacher", Recipe.model_fields["teacher"].annotation, prefix="teacher_"
        )
        params += [p for p in teacher_params if p[0].split("__", 1)[1] in TEACHER_FLAGS]
    if name in EXECUTOR_STAGES:
        option = typer.Option(
            None,
            "--executor",
            help="local (this process) or ray (Ray Data actors on ray.address; pip install 'compeff[ray]'). "
            "Recipe key: run.executor.",
            show_default=False,
        )
        kw = inspect.Parameter.KEYWORD_ONLY
        params.append(
            (
                "run__executor",
                inspect.Parameter("run__executor", kw, default=option, annotation=Optional[str]),
            )
        )

    def command(**kwargs: Any) -> None:
        def body() -> None:
            from compeff.serving import calls_teacher, serving

            recipe = recipe_from_flags(kwargs)  # validated before any model loads
            run = get_stage(name)
            with serving(recipe) if calls_teacher(recipe, [name]) else nullcontext(recipe) as served:
                manifest = run(served, force=kwargs.get("force", False))
            if not manifest:  # a follower rank of a distributed job: rank 0 reports
                return
            counts = manifest.get("counts", {})
            typer.echo(
                f"{name}: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed -> "
                f"{recipe.run_dir / (getattr(getattr(recipe, name, None), 'stage', None) or name)}"
            )

        guarded(body)

    command.__name__ = name.replace("-", "_")
    command.__doc__ = help_text
    command.__signature__ = inspect.Signature([p for _, p in params])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for _, p in params}
    app.command(name, help=help_text)(command)


stage_command(
    "teach",
    "Answer a jsonl of chat requests with the recipe's teacher (resumable; failures kept).",
    ["teach"],
    teacher=True,
)
stage_command(
    "enumerate",
    "User texts -> sentiment attributes named by the teacher (name, description, count).",
    ["enumerate", "data"],
    teacher=True,
)
stage_command(
    "cluster",
    "Attributes -> analytical perspectives (embeddings + frequency-weighted affinity propagation).",
    ["cluster", "embedder"],
)
stage_command(
    "tasks",
    "Perspectives -> tasks with output formats and demonstrations, written by the teacher.",
    ["tasks"],
    teacher=True,
)
stage_command(
    "generate",
    "Tasks x user texts -> the distillation set (chat messages + metadata).",
    ["generate"],
    teacher=True,
)
stage_command(
    "score",
    "Per-sample difficulty under a student (rank score, IFD, perplexity, length).",
    ["score", "student"],
)
stage_command(
    "sample",
    "Keep the most informative share of the scored set (difficulty-prioritised sampling).",
    ["sample"],
)
stage_command("sft", "Fine-tune the student on the retained set (TRL; LoRA or full).", ["sft", "student"])
stage_command(
    "eval", "Accuracy / macro-F1 of a model on labelled sets (k-shot label-word scoring).", ["eval"]
)
stage_command("kd", "Distil encoder classifiers from a teacher's soft labels.", ["kd"])


@bench_app.command("encoders")
def bench_encoders(
    models: list[str] = typer.Argument(None, help="Classifier folders (e.g. runs/tweeteval-kd/kd-teacher)."),
    test_set: str = typer.Option(
        "tweeteval_sentiment:test", "--test-set", help="Labelled set for accuracy and inputs."
    ),
    train_set: str = typer.Option(
        "tweeteval_sentiment:validation", "--train-set", help="Calibration and baseline texts."
    ),
    limit: int = typer.Option(1000, "--limit", help="Stratified test texts scored for accuracy."),
    timed: int = typer.Option(256, "--timed", help="Test texts timed per (model, backend, batch size)."),
    batch_size: list[int] = typer.Option([1, 32], "--batch-size", help="Batch sizes (repeatable)."),
    threads: int = typer.Option(2, "--threads", help="Threads for every backend."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed warm-up batches."),
    calibration: int = typer.Option(128, "--calibration", help="Training texts calibrating static INT8."),
    fixed_length: int | None = typer.Option(None, "--fixed-length", help="Pad every input to this length."),
    backend: list[str] = typer.Option(None, "--backend", help="Backends (repeatable; default: all)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where the table, CSV, JSON and plots go."),
) -> None:
    """Latency / throughput / memory / power / accuracy of encoder classifiers, PyTorch and ONNX Runtime."""
    from compeff.bench.encoders import run_encoder_bench

    guarded(
        lambda: run_encoder_bench(
            models or [],
            test_set,
            train_set,
            limit,
            timed,
            batch_size,
            threads,
            warmup,
            calibration,
            fixed_length=fixed_length,
            backends=backend or None,
            out_dir=out,
        )
    )


@bench_app.command("cluster")
def bench_cluster(
    n_attributes: int = typer.Option(
        2000, "--n-attributes", help="Synthetic attributes (Zipf counts, max ~13,000)."
    ),
    percentile: float = typer.Option(0.5, "--percentile", help="Preference percentile (paper: 0.5)."),
    max_iter: int = typer.Option(1000, "--max-iter", help="Affinity propagation iterations."),
    out: Path | None = typer.Option(None, "--out", help="Write cluster_bench.json here."),
    noise_floor: bool = typer.Option(
        True,
        "--noise-floor/--no-noise-floor",
        help="Run the reference with a second seed to measure its own ARI.",
    ),
) -> None:
    """Weighted affinity propagation vs the paper's repeated embeddings: time, peak memory, ARI."""
    from compeff.bench.cluster import run_cluster_bench

    guarded(
        lambda: run_cluster_bench(
            n_attributes=n_attributes,
            percentile=percentile,
            max_iter=max_iter,
            out_dir=out,
            noise_floor=noise_floor,
        )
    )


@bench_app.command("generate")
def bench_generate(
    n_samples: int = typer.Option(12000, "--n-samples", help="Samples per measurement."),
    concurrency: int = typer.Option(256, "--concurrency", help="Requests in flight."),
    latency_ms: float = typer.Option(50.0, "--latency-ms", help="Server latency per request."),
    out: Path | None = typer.Option(None, "--out", help="Write generate_bench.json here."),
    rounds: int = typer.Option(3, "--rounds", help="Interleaved rounds; the median is reported."),
    executor: list[str] = typer.Option(
        ["local"],
        "--executor",
        help="local, ray: ray adds the stage on a local Ray beside local (repeatable).",
    ),
    ray_actors: int = typer.Option(2, "--ray-actors", help="Actors of the Ray row."),
    ray_batch_size: int = typer.Option(64, "--ray-batch-size", help="Requests per Ray batch."),
) -> None:
    """samples/s of the generate stage vs the raw client, against a loopback server (and on Ray)."""
    from compeff.bench.generate import run_generate_bench

    unknown = sorted(set(executor) - {"local", "ray"})
    if unknown:
        raise fail(f"--executor: local or ray, not {', '.join(unknown)}")
    guarded(
        lambda: run_generate_bench(
            n_samples=n_samples,
            concurrency=concurrency,
            latency_ms=latency_ms,
            out_dir=out,
            rounds=rounds,
            executors=tuple(executor),
            ray_actors=ray_actors,
            ray_batch_size=ray_batch_size,
        )
    )


@bench_app.command("score")
def bench_score(
    samples: int = typer.Option(200, "--samples", help="Samples scored by both paths."),
    vocab: int = typer.Option(
        32000, "--vocab", help="Output vocabulary of the local scorer (>= 32k on CPU)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Samples per forward pass of the fast path."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu' or 'cuda'."),
    dtype: str = typer.Option("float32", "--dtype", help="Scorer weights dtype."),
    out: Path | None = typer.Option(None, "--out", help="Write score_bench_<device>.json here."),
) -> None:
    """Tokens scored per second: vectorised rank score vs the per-token reference loop."""
    from compeff.bench.score import run_score_bench

    guarded(
        lambda: run_score_bench(
            n_samples=samples, vocab=vocab, batch_size=batch_size, device=device, dtype=dtype, out_dir=out
        )
    )


@bench_app.command("proxy")
def bench_proxy(
    samples: int = typer.Option(3000, "--samples", help="Samples scored, then split for the proxy."),
    head: str = typer.Option("ridge", "--head", help="Proxy regressor: ridge or mlp."),
    out: Path = typer.Option(
        Path("runs/bench"), "--out", help="Run folder root; proxy_bench.json goes here."
    ),
) -> None:
    """Spearman of the difficulty proxy with rho on held-out samples, and teacher calls it saves."""
    from compeff.bench.proxy import run_proxy_bench

    guarded(lambda: run_proxy_bench(n_samples=samples, out_dir=out, head=head))


@bench_app.command("sft")
def bench_sft(
    model: str = typer.Option("builtin:smollm2", "--model", help="Student to train."),
    steps: int = typer.Option(30, "--steps", help="Optimiser steps per configuration."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per step."),
    max_length: int = typer.Option(512, "--max-length", help="Tokens per sample (and per packed row)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Run folder root; sft_bench.json goes there."),
    method: list[str] = typer.Option(["full", "lora"], "--method", help="full and/or lora (repeatable)."),
    packing: list[str] = typer.Option(["off", "on"], "--packing", help="off and/or on (repeatable)."),
    head: list[str] = typer.Option(
        ["answer-only", "full"], "--head", help="Output layer at answer positions only and/or everywhere."
    ),
) -> None:
    """Training tokens/s of full fine-tuning and LoRA, packing off and on, the output layer at answer
    positions only or everywhere."""
    from compeff.bench.sft import run_sft_bench
    from compeff.config import ConfigError

    def run() -> object:
        bad = sorted(set(method) - {"full", "lora"}) + sorted(set(packing) - {"off", "on"})
        bad += sorted(set(head) - {"answer-only", "full"})
        if bad:
            raise ConfigError(f"bench sft: unknown --method / --packing / --head {', '.join(bad)}")
        return run_sft_bench(model=model, steps=steps, batch_size=batch_size, max_length=max_length,
                             out_dir=out, packing=tuple(p == "on" for p in packing), heads=tuple(head),
                             methods=tuple(method))  # fmt: skip

    guarded(run)


@bench_app.command("kd-memory")
def bench_kd_memory(
    model: str = typer.Option(
        "builtin:smollm2", "--model", help="Student whose tokenizer spells the samples."
    ),
    samples: int = typer.Option(10_000, "--samples", min=1, help="Synthetic distillation samples."),
    prompt_tokens: int = typer.Option(
        100, "--prompt-tokens", min=1, help="About this many prompt tokens each."
    ),
    answer_tokens: int = typer.Option(
        500, "--answer-tokens", min=1, help="About this many answer tokens each."
    ),
    top_k: int = typer.Option(20, "--top-k", min=1, help="Teacher log-probabilities per answer token."),
    layout: list[str] = typer.Option(
        ["answer-only arrays", "full-length lists"], "--layout", help="Row layouts to measure (repeatable)."
    ),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for kd_memory_bench.json."),
) -> None:
    """Peak memory of sft.loss: kd's teacher arrays: today's answer-only numpy rows against the full-length
    Python lists of before, on the same synthetic samples."""
    from compeff.bench.kd_memory import LAYOUTS, run_kd_memory_bench
    from compeff.config import ConfigError

    def run() -> object:
        bad = sorted(set(layout) - set(LAYOUTS))
        if bad:
            raise ConfigError(
                f"bench kd-memory: unknown --layout {', '.join(bad)} (known: {', '.join(LAYOUTS)})"
            )
        return run_kd_memory_bench(model, samples, prompt_tokens, answer_tokens, top_k, tuple(layout), out)

    guarded(run)


@bench_app.command("labels")
def bench_labels(
    teacher: str = typer.Option("builtin:smollm2", "--teacher", help="Teacher model (local)."),
    imdb: int = typer.Option(200, "--imdb", min=1, help="IMDb train reviews (2-way polarity task)."),
    tweeteval: int = typer.Option(
        300, "--tweeteval", help="TweetEval validation tweets (3-way polarity task)."
    ),
    max_chars: int = typer.Option(400, "--max-chars", help="Texts are cut to this many characters."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for labels_bench.json."),
    seed_tasks_file: str | None = typer.Option(
        None,
        "--seed-tasks-file",
        help="Candidate wordings: a tasks.seed_tasks_file whose polarity / polarity3 replace the built-in ones.",
    ),
) -> None:
    """How often the teacher's labels are right: per wording of the polarity seed tasks (or candidate
    wordings), ensembled over them, batch- and contextually calibrated, and above confidence thresholds."""
    from compeff.bench.labels import run_labels_bench

    guarded(
        lambda: run_labels_bench(
            teacher, imdb, tweeteval, max_chars, out_dir=out, seed_tasks_file=seed_tasks_file
        )
    )


@bench_app.command("distill")
def bench_distill(
    recipe: Path = typer.Option(Path("recipes/quickstart.yaml"), "--recipe", help="Recipe of the chain."),
    samples: int = typer.Option(256, "--samples", help="Samples the teacher writes (generate.n_samples)."),
    tweeteval: int = typer.Option(1000, "--tweeteval", help="TweetEval test tweets scored (stratified)."),
    imdb: int = typer.Option(500, "--imdb", help="IMDb test reviews scored (stratified)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a recipe key (repeatable)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Run folder root (run distill-bench there)."),
    loss: list[str] = typer.Option(
        ["sft"], "--loss", help="sft, kd (offline top-k logit KD), gkd (repeatable)."
    ),
    top_k: int = typer.Option(
        20, "--top-k", help="With --loss kd: teacher log-probabilities kept per token."
    ),
    subset: list[str] = typer.Option(
        ["selected", "random", "all"],
        "--subset",
        help="Plain-SFT rows: selected, random, all (repeatable; KD / GKD train on selected).",
    ),
    seeds: int = typer.Option(
        1, "--seeds", min=1, help="Training seeds of the selected-set SFT and KD rows."
    ),
    gold: bool = typer.Option(True, "--gold/--no-gold", help="Add the gold-label ceiling row."),
    fraction: list[float] = typer.Option(
        [], "--fraction", help="Data-efficiency rows: SFT on the selected and a random share (repeatable)."
    ),
    min_confidence: float | None = typer.Option(
        None, "--min-confidence", help="Add an SFT row on the selected set without low-confidence labels."
    ),
    draws: int = typer.Option(
        1, "--draws", min=1, help="With --fraction: draws of each selected and random subset (mean, spread)."
    ),
) -> None:
    """Teacher, student before training and after SFT on selected / random / all samples, KD / GKD on the
    selected set, and the gold-label ceiling, side by side: accuracy, macro-F1 and agreement with the
    teacher over the ruler's wordings, and in brackets agreement with the teacher's labels
    batch-calibrated on the test texts (the teacher a batch-calibrated chain teaches, estimated)."""
    from compeff.bench.distill import run_distill_bench

    guarded(
        lambda: run_distill_bench(
            recipe_path=recipe,
            n_samples=samples,
            tweeteval=tweeteval,
            imdb=imdb,
            out_dir=out,
            overrides=list(set_ or []),
            losses=tuple(loss),
            top_k=top_k,
            subsets=tuple(subset),
            seeds=seeds,
            gold=gold,
            fractions=tuple(fraction),
            min_confidence=min_confidence,
            draws=draws,
        )
    )


@bench_app.command("cut")
def bench_cut(
    recipe: Path = typer.Option(
        Path("recipes/quickstart.yaml"), "--recipe", help="Recipe (student, eval, sft)."
    ),
    cut: list[str] = typer.Option(
        ["recipe", "closest"],
        "--cut",
        help="Layers to keep: 0-7,28-29 style, recipe (student.keep_layers, or the closest cut of student.cut_layers) or closest (the block cut that "
        "moves the residual stream least) (repeatable).",
    ),
    train_texts: int = typer.Option(
        200, "--train", help="Labelled training texts per split (IMDb, TweetEval)."
    ),
    tweeteval: int = typer.Option(200, "--tweeteval", help="TweetEval test tweets scored (stratified)."),
    imdb: int = typer.Option(200, "--imdb", help="IMDb test reviews scored (stratified)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a recipe key (repeatable)."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Run folder root (run cut-bench there)."),
) -> None:
    """Each way of cutting the student, before and after SFT on true labels (its gold-label ceiling), with
    how far the cut moves the residual stream: accuracy, macro-F1 and agreement with the teacher."""
    from compeff.bench.cut import run_cut_bench

    guarded(
        lambda: run_cut_bench(
            recipe_path=recipe,
            cuts=tuple(cut),
            train_texts=train_texts,
            tweeteval=tweeteval,
            imdb=imdb,
            out_dir=out,
            overrides=list(set_ or []),
        )
    )


@bench_app.command("teacher")
def bench_teacher(
    concurrency: list[int] = typer.Option(
        [1, 32, 256], "--concurrency", help="Requests in flight (repeatable)."
    ),
    latency_ms: list[float] = typer.Option(
        [0.0, 50.0], "--latency-ms", help="Server latency per request (repeatable)."
    ),
    requests: int = typer.Option(
        3000,
        "--requests",
        help="Requests per cell (shortened to ~4 s of work where latency makes cells slow).",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write teacher_bench.json and teacher_bench.md here."
    ),
    bare: bool = typer.Option(
        True,
        "--bare/--no-bare",
        help="Also time a bare aiohttp loop in each cell (the transport's ceiling here).",
    ),
    server: str = typer.Option(
        "fake",
        "--server",
        help="fake: compeff's loopback server (requests/s); llamacpp: the generate stage against llama.cpp's "
        "server on SmolLM2, tokens/s against llama_cpp.Llama in-process.",
    ),
    samples: int = typer.Option(48, "--samples", help="--server llamacpp: samples generated."),
    threads: int = typer.Option(2, "--threads", help="--server llamacpp: CPU threads of server and ceiling."),
    recipe: Path = typer.Option(
        Path("recipes/quickstart.yaml"), "--recipe", help="--server llamacpp: recipe."
    ),
) -> None:
    """Requests/s the openai backend sustains against a loopback server answering at once or after a delay;
    with --server llamacpp, the generate stage's tokens/s against a real server's own ceiling."""
    from compeff.bench.teacher import run_teacher_bench

    def body() -> None:
        if server == "llamacpp":
            from compeff.bench.served import run_served_generate_bench

            run_served_generate_bench(recipe, samples, threads, out or Path("runs/bench"))
            return
        if server != "fake":
            raise ConfigError(f"--server: fake or llamacpp, not {server!r}")
        run_teacher_bench(
            concurrency=concurrency, latency_ms=latency_ms, n_requests=requests, out_dir=out, bare=bare
        )

    guarded(body)


@app.command("run")
def run_recipe(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/quickstart.yaml."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a recipe key (repeatable)."),
    stage: list[str] | None = typer.Option(
        None, "--stage", help="Run only these stages (repeatable; default: the recipe's run.stages)."
    ),
    force: bool = typer.Option(False, "--force", help="Start every stage over."),
) -> None:
    """Run the recipe's stages in order: finished ones are skipped, interrupted ones resume, changed ones
    start over with the later stages of their chain. Writes <run>/report.md and report.html."""
    from compeff.pipeline import run_pipeline
    from compeff.serving import calls_teacher, serving
    from compeff.stages import implemented_stages

    def body() -> None:
        config = load_recipe(recipe, set_ or [])
        names = stage or config.run.stages or implemented_stages()
        with serving(config) if calls_teacher(config, names) else nullcontext(config) as served:
            run_pipeline(served, stages=stage or None, force=force)
        typer.echo(f"run folder: {config.run_dir}  report: {config.run_dir / 'report.html'}")

    guarded(body)


@app.command("serve")
def serve(
    recipe: Optional[Path] = typer.Argument(  # noqa: UP045 - typer reads the annotation
        None, help="YAML recipe whose teacher.serve says what to start (none: defaults and --set)."
    ),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a recipe key (repeatable)."),
) -> None:
    """Start the teacher's servers alone (teacher.serve), print their URLs and keep them up until Ctrl-C,
    for several runs to share (give them --set 'teacher.base_urls=[...]')."""
    from compeff.serving import serve_forever

    def ready(urls: list[str]) -> None:
        typer.echo("teacher servers ready (Ctrl-C stops them):")
        for url in urls:
            typer.echo(f"  {url}")
        typer.echo(
            f"use: --set 'teacher.base_urls={json.dumps([str(u) for u in urls])}' --set teacher.backend=openai"
        )

    guarded(lambda: serve_forever(load_recipe(recipe, set_ or []), ready))


@app.command("report")
def report(run_dir: Path = typer.Argument(..., help="A run folder, e.g. runs/quickstart.")) -> None:
    """Rebuild a run's report.md and report.html from its stage folders."""
    from compeff.report import write_report

    def body() -> None:
        if not run_dir.is_dir():
            raise DataError(f"{run_dir}: no such run folder")
        path = write_report(run_dir)
        typer.echo(f"{path} and {path.with_suffix('.html')}")

    guarded(body)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="compeff")


if __name__ == "__main__":
    sys.exit(main())
