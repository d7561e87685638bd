"""The openai backend against a real OpenAI-compatible server: llama.cpp's, serving builtin:smollm2's GGUF
on 127.0.0.1, started and stopped by compeff's own ``teacher.serve``.

Needs ``llama-cpp-python[server]`` (``pip install -e '.[serve]'``; CI installs it and sets
``COMPEFF_REQUIRE_LLAMACPP=1``, so there these tests fail rather than skip when it is missing).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compeff.config import load_recipe
from compeff.runs import iter_jsonl

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMACPP = True
except ImportError:
    HAVE_LLAMACPP = False

if not HAVE_LLAMACPP:
    if os.environ.get("COMPEFF_REQUIRE_LLAMACPP") == "1":
        raise RuntimeError(
            "COMPEFF_REQUIRE_LLAMACPP=1 but llama_cpp does not import: pip install -e '.[serve]'"
        )
    pytest.skip(
        "llama-cpp-python[server] is not installed (pip install -e '.[serve]')", allow_module_level=True
    )

from compeff.serving import ServerFailed, ServerPool, serving  # noqa: E402

SERVE = ["teacher.serve.engine=llamacpp", "teacher.serve.n_threads=2", "teacher.serve.startup_timeout_s=120"]


def served_recipe(run_dir: Path, url: str, *sets: str):
    """A recipe whose teacher is the running server (openai backend, llama.cpp's response format)."""
    return load_recipe(
        None,
        [f"run.dir={run_dir}", "run.name=real", "teacher.backend=openai", f"teacher.base_urls=[{url}]",
         "teacher.response_format=json_object", "teacher.concurrency=2", "teacher.cache=null",
         "teacher.timeout_s=300", *sets],
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One llama.cpp server for the module (compeff's ServerPool: free port, ready on /v1/models)."""
    recipe = load_recipe(None, ["teacher.backend=openai", *SERVE])
    pool = ServerPool(recipe.teacher, tmp_path_factory.mktemp("servers"))
    url = pool.start()[0]
    yield url
    pool.stop()


def test_label_words_scored_from_the_served_tokens(server, tmp_path):
    """eval --backend openai on 2- and 3-label sets: every label is scored from the server's own first
    tokens (this used to stop at "the served token 'n' starts several label words")."""
    from compeff.evaluate.classification import label_pieces, label_variants
    from compeff.evaluate.eval_stage import run_eval_stage
    from compeff.teachers.tokenize_api import served_first_pieces

    three = ["negative", "neutral", "positive"]
    first = served_first_pieces(server, "builtin:smollm2", [v for n in three for v in label_variants(n)])
    assert first is not None  # llama-cpp-python's /extras/tokenize dialect
    pieces = label_pieces(first, three)
    assert set(pieces.values()) == {0, 1, 2}
    assert all(any(v.startswith(p) for v in label_variants(three[i])) for p, i in pieces.items())
    recipe = served_recipe(tmp_path, server, "eval.model=teacher", "eval.backend=openai", "eval.wordings=[question]",
                           "eval.limit=8", "eval.max_chars=200", "eval.seeds=[42]",
                           "eval.sets=[tweeteval_sentiment:test, imdb:test]")  # fmt: skip
    manifest = run_eval_stage(recipe, progress=False)
    rows = list(iter_jsonl(tmp_path / "real" / "eval" / "data.jsonl"))
    assert len(rows) == 16 and manifest["counts"]["failed"] == 0
    scored = [r for r in rows if r["pred"] >= 0]
    assert len(scored) >= 12  # SmolLM2's top-20 first tokens name a label for (nearly) every text
    for r in scored:
        assert np.isfinite(r["scores"][r["pred"]])


def test_the_served_tokenizer_is_fingerprinted_from_the_server(server, tmp_path):
    """llama-cpp-python's tokenize endpoint gives the probe texts the ids SmolLM2's own tokenizer gives
    them (the GGUF's tokenizer is the student's); a tokenizer of another family differs."""
    from transformers import AutoTokenizer

    from compeff.models import build_tiny_chat_model, resolve_model
    from compeff.teachers.tokenize_api import served_vocabulary
    from compeff.top_logprobs import tokenizer_probe_fingerprint

    served = served_vocabulary(server, "builtin:smollm2")
    assert served is not None and served.dialect == "llama-cpp-python"
    local = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2"))
    assert served.fingerprint == tokenizer_probe_fingerprint(local)
    other = AutoTokenizer.from_pretrained(build_tiny_chat_model(tmp_path / "other"))
    assert served.fingerprint != tokenizer_probe_fingerprint(other)


def test_local_and_served_teacher_read_labels_alike(server, tmp_path):
    """The same 60 tweets and wording through the local model (the GGUF's weights dequantised) and the
    server (llama.cpp computing with the 4-bit blocks): the same label on >= 95% of texts, label
    probabilities close (one arithmetic for both: every spelling's first token, renormalised over labels)."""
    from compeff.evaluate.classification import HFLabelScorer, label_distribution
    from compeff.evaluate.eval_stage import ServedLabelScorer, load_eval_set
    from compeff.evaluate.ruler import wording_prompts
    from compeff.evaluate.wordings import BUILTIN_WORDINGS

    data = load_eval_set("tweeteval_sentiment:test", 60, 42, None)
    turns = wording_prompts(data, BUILTIN_WORDINGS["question"], None, 0, 300)
    local = label_distribution(
        HFLabelScorer("builtin:smollm2", chat_template=True).label_log_mass(turns, data.label_names)
    )
    served = label_distribution(
        ServedLabelScorer(served_recipe(tmp_path, server)).label_log_mass(turns, data.label_names)
    )
    same = float(np.mean(local.argmax(1) == served.argmax(1)))
    gap = np.abs(local - served).max(axis=1)
    print(
        f"same label {same:.3f}; probability gap mean {gap.mean():.4f}, 95th pct {np.quantile(gap, 0.95):.4f}, max {gap.max():.4f}"
    )
    assert same >= 0.95
    assert float(np.median(gap)) <= 0.05 and float(np.quantile(gap, 0.9)) <= 0.1


def test_a_request_the_server_refuses_is_not_retried(server):
    """llama-cpp-python answers the OpenAI json_schema dialect with HTTP 500 and a validation error: one
    attempt, and the error points at teacher.response_format."""
    from compeff.teachers import ChatRequest, SamplingParams, make_teacher

    settings = load_recipe(None, ["teacher.backend=openai", f"teacher.base_urls=[{server}]",
                                  "teacher.response_format=json_schema", "teacher.max_retries=3"]).teacher  # fmt: skip
    params = SamplingParams(max_tokens=8, json_schema=json.dumps({"type": "object"}))
    teacher = make_teacher(settings)
    try:
        (result,) = list(
            teacher.generate(
                [ChatRequest(id="r", messages=[{"role": "user", "content": "hi"}], params=params)]
            )
        )
    finally:
        teacher.close()
    assert not result.ok and result.attempts == 1
    assert "HTTP 500" in result.error and "teacher.response_format" in result.error


def test_chain_through_the_real_server_with_structured_output(server, tmp_path):
    """enumerate, cluster, tasks (constrained JSON in llama.cpp's dialect) and generate, then a generate
    killed mid-way and resumed: every sample once."""
    from compeff.pipeline import run_pipeline

    sets = ["data.user_texts=[imdb:unsupervised, tweeteval_sentiment:validation]", "enumerate.n_texts=6",
            "enumerate.min_frac=0.01", "enumerate.max_chars=300", "teacher.max_tokens=160", "tasks.max_tokens=512",
            "cluster.n_perspectives_hint=2", "tasks.max_perspectives=1", "tasks.analysis_instructions=2",
            "tasks.ideas_per_perspective=1", "tasks.min_examples=1", "tasks.demo_calls=1", "tasks.min_demos=0",
            "generate.max_tokens=24", "generate.max_chars=200", "generate.k_demos=0"]  # fmt: skip
    recipe = served_recipe(tmp_path, server, *sets, "generate.n_samples=4")
    run_pipeline(recipe, stages=["enumerate", "cluster", "tasks", "generate"], show=False)
    run = tmp_path / "real"
    answers = list(iter_jsonl(run / "enumerate" / "data.jsonl"))
    assert len(answers) >= 4  # structured output: the answers parse
    for a in answers:
        assert a["answer"].lstrip().startswith("{") and a["attributes"]  # constrained: JSON (maybe cut)
    assert (run / "tasks" / "tasks.jsonl").stat().st_size > 0
    assert len({r["id"] for r in iter_jsonl(run / "generate" / "data.jsonl")}) == 4

    # kill + resume of a bigger generate (started over: n_samples changed), through the CLI, keeping the
    # server's top-5 log-probabilities of every answer token
    recipe_file = tmp_path / "recipe.yaml"
    bigger = served_recipe(
        tmp_path, server, *sets, "generate.n_samples=12", "generate.teacher_top_logprobs=5"
    )
    recipe_file.write_text(json.dumps(bigger.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "compeff.cli", "generate", "--config", str(recipe_file)]
    data = run / "generate" / "data.jsonl"
    proc = subprocess.Popen(
        cmd + ["--force"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if data.exists() and sum(1 for _ in data.open()) >= 6:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = sum(1 for _ in data.open())
    assert 4 <= killed_at < 12
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [r["id"] for r in iter_jsonl(data)]
    assert len(ids) == len(set(ids)) == 12
    # the served tokens map into SmolLM2's vocabulary and spell every answer (what sft.loss: kd checks)
    from transformers import AutoTokenizer

    from compeff import top_logprobs
    from compeff.models import resolve_model
    from compeff.train.logit_kd import kd_features

    rows = list(iter_jsonl(data))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2"))
    for r in rows:
        if "label_probs" in r:  # a seed task: answered as a label distribution, not sampled text
            assert sum(r["label_probs"].values()) == pytest.approx(1.0, abs=1e-3)
            assert r["messages"][-1]["content"] == max(r["label_probs"], key=r["label_probs"].get)
            continue
        field = r[top_logprobs.FIELD]
        assert field["k"] == 5 and field["n"] >= 1 and field["unmapped"] <= field["n"]
        assert field["vocab"] == top_logprobs.tokenizer_probe_fingerprint(tokenizer)  # asked of the server
    pairs = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    features, refused, _ = kd_features(tokenizer, rows, pairs, 2048)
    assert len(features) >= 10, refused


def test_llm_soft_labels_served_for_kd(server, tmp_path):
    """kd with soft_labels: llm reads the label distributions from the served teacher."""
    from compeff.train.blackbox import served_llm_soft_labels
    from compeff.train.kd_stage import run_kd_stage

    recipe = served_recipe(tmp_path, server)
    texts = [
        "I loved every minute of it, a wonderful film.",
        "Dull, slow and far too long. Awful.",
        "It was on TV.",
    ]
    probs = served_llm_soft_labels(recipe, texts, ["negative", "positive"])
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1.0)
    assert not np.allclose(probs, 0.5)  # the server's log-probabilities, not the uniform fallback
    kd = served_recipe(tmp_path, server, "kd.soft_labels=llm", "kd.train_limit=12", "kd.test_limit=12",
                       "kd.max_length=32", "kd.teacher_epochs=1", "kd.student_epochs=1", "kd.batch_size=8",
                       "kd.students=[{name: one, init_from_teacher: true, layers: [0]}]", "kd.losses=[kd]",
                       "kd.seeds=[1]", "kd.baselines=false")  # fmt: skip
    run_kd_stage(kd, progress=False)
    rows = {r["id"] for r in iter_jsonl(tmp_path / "real" / "kd" / "data.jsonl")}
    assert "one|kd|1" in rows


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def test_serve_restarts_a_dead_server_once_then_fails(tmp_path):
    """A server killed mid-run comes back on the same port; a second death stops the run with its log."""
    import urllib.request

    recipe = load_recipe(None, [f"run.dir={tmp_path}", "run.name=s", "teacher.backend=openai", *SERVE])
    with pytest.raises(ServerFailed, match="died twice"), serving(recipe) as served:
        url = str(served.teacher.base_urls[0])
        described = json.loads((tmp_path / "s" / "servers" / "servers.json").read_text())
        pid = described[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        new: list[int] = []
        while time.monotonic() < deadline and not new:  # the watchdog restarts it on the same port
            time.sleep(0.3)
            if [p for p in _server_pids(url) if p != pid]:
                try:
                    with urllib.request.urlopen(f"{url}/models", timeout=2) as resp:
                        new = [p for p in _server_pids(url) if p != pid] if resp.status == 200 else []
                except OSError:
                    pass
        assert new, "the server did not come back"
        listing = tmp_path / "s" / "servers" / "servers.json"
        while time.monotonic() < deadline and json.loads(listing.read_text())[0]["restarts"] != 1:
            time.sleep(0.2)  # the watchdog has seen it ready again and recorded the restart
        assert json.loads(listing.read_text())[0]["restarts"] == 1
        os.kill(new[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.2)  # the watchdog interrupts this loop with ServerFailed
    assert "llama_cpp.server" in (tmp_path / "s" / "servers" / "llamacpp-0.log").read_text()


def _server_pids(url: str) -> list[int]:
    port = url.rsplit(":", 1)[1].split("/")[0]
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"llama_cpp.server" in cmdline and port.encode() in cmdline and _alive(int(proc.name)):
                pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_compeff_serve_leaves_no_server_behind(tmp_path, how):
    """compeff serve killed (SIGKILL: the kernel takes the server down with it) or stopped (SIGTERM: the
    servers are stopped on the way out): no server outlives it."""
    cmd = [sys.executable, "-m", "compeff.cli", "serve", "--set", f"run.dir={tmp_path}",
           "--set", "run.name=s", *[a for s in SERVE for a in ("--set", s)]]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listing = tmp_path / "s" / "servers" / "servers.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not listing.exists() and proc.poll() is None:
        time.sleep(0.2)
    assert listing.exists(), proc.stdout.read() if proc.poll() is not None else "no servers.json"
    pid = json.loads(listing.read_text())[0]["pid"]
    assert _alive(pid)
    proc.send_signal(getattr(signal, how))
    proc.wait(30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid)
