"""A served teacher's tokenizer, asked of the server: its fingerprint against the student's before any
log-probability is kept (one line and exit 2 on a mismatch), token ids named by the server, and a
tokenize endpoint that did not answer once asked again (loopback fake server speaking vLLM's dialect)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import compeff_cmd
from transformers import AutoTokenizer

from compeff import top_logprobs
from compeff.config import load_recipe
from compeff.models import build_tiny_chat_model
from compeff.runs import iter_jsonl
from compeff.teachers.fake_server import FakeServer, FaultPlan

ANSWER = "the film was great, and the music fun"


@pytest.fixture(scope="module")
def other_lm(tmp_path_factory) -> Path:
    """A tiny LM of another family: its tokenizer was trained with another vocabulary size."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("other-lm"), vocab_size=400)


def write_recipe(tmp_path: Path, url: str, student: Path, name: str = "served") -> Path:
    """A generate recipe against ``url`` (openai backend) keeping the top-3, with the seed polarity tasks
    answered in sampled text, and those tasks already in the run folder."""
    from compeff.synth.seed_tasks import seed_task_rows

    tmp_path.mkdir(parents=True, exist_ok=True)
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "".join(json.dumps({"id": f"u{i}", "text": f"the film {i} was fun"}) + "\n" for i in range(6))
    )
    data = {
        "run": {"name": name, "dir": str(tmp_path / "runs")},
        "teacher": {
            "backend": "openai",
            "model": "teacher",
            "base_urls": [url],
            "cache": None,
            "max_retries": 0,
        },
        "student": {"model": str(student)},
        "data": {"user_texts": [str(texts)]},
        "generate": {"n_samples": 6, "teacher_top_logprobs": 3, "label_scoring": False, "qc": False},
    }
    tasks = tmp_path / "runs" / name / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seed_task_rows(["polarity"])))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_token_ids_named_by_the_server_and_ambiguous_texts(tiny_lm):
    """An entry's id is the one it names (``id``, or vLLM's ``token_id:N``); a token text that several
    ids decode to (partial UTF-8 pieces all decode to U+FFFD) names none of them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    lookup = top_logprobs.token_id_lookup(tokenizer)
    assert lookup({"token": "token_id:7", "logprob": -1.0}) == 7
    assert lookup({"token": "whatever", "id": 3}) == 3
    pieces = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd"]
    assert len(pieces) > 1
    assert lookup({"token": "\ufffd"}) is None
    the = tokenizer(" the", add_special_tokens=False)["input_ids"]
    assert len(the) == 1 and lookup({"token": " the"}) == the[0]


def test_generate_refuses_a_served_teacher_of_another_vocabulary(tmp_path, tiny_lm, other_lm):
    """The served tokenizer is another family's: generate stops before any call with one line, exit 2;
    a server that cannot say which tokenizer it serves is refused the same way."""
    with FakeServer(tokenizer=other_lm) as srv:
        recipe = write_recipe(tmp_path, srv.base_url, tiny_lm)
        proc = subprocess.run(
            compeff_cmd("generate", "--config", str(recipe)), capture_output=True, text=True, timeout=300
        )
        chats = srv.stats.requests - srv.stats.tokenize_calls
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: generate.teacher_top_logprobs: the served")
    assert "is not the student's" in errors[0] and "probe:" in errors[0]
    assert chats <= 3 * 2  # detokenize calls at most: no chat completion was asked for

    with FakeServer() as srv:  # no tokenize endpoint
        recipe = write_recipe(tmp_path / "bare", srv.base_url, tiny_lm)
        proc = subprocess.run(
            compeff_cmd("generate", "--config", str(recipe)), capture_output=True, text=True, timeout=300
        )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "has no tokenize endpoint compeff knows" in errors[0]


def test_served_ids_and_fingerprint_reach_kd(tmp_path, tiny_lm, other_lm):
    """The served tokenizer is the student's: the answers' tokens come back as ids (vLLM's
    return_tokens_as_token_ids), the samples carry the server's probe fingerprint, and sft.loss: kd's
    vocabulary check compares the student by the same probe (another student is refused)."""
    from compeff.synth.generate import run_generate_stage
    from compeff.train.logit_kd import VocabularyMismatch, check_vocabulary, kd_features

    bodies = []

    def responder(messages, body):
        bodies.append(body)
        return ANSWER

    with FakeServer(tokenizer=tiny_lm, responder=responder) as srv:
        recipe = load_recipe(write_recipe(tmp_path, srv.base_url, tiny_lm))
        run_generate_stage(recipe, progress=False)
    rows = list(iter_jsonl(recipe.run_dir / "generate" / "data.jsonl"))
    assert len(rows) == 6 and len(bodies) == 6
    assert all(b.get("return_tokens_as_token_ids") is True for b in bodies)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    for row in rows:
        field = row[top_logprobs.FIELD]
        assert field["vocab"] == top_logprobs.tokenizer_probe_fingerprint(tokenizer)
        assert field["unmapped"] == 0 and top_logprobs.unpack(field)[0].tolist() == ids
    check_vocabulary(tokenizer, rows)
    with pytest.raises(VocabularyMismatch, match="teacher's vocabulary"):
        check_vocabulary(AutoTokenizer.from_pretrained(other_lm), rows)
    pairs = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    features, refused, _ = kd_features(tokenizer, rows, pairs, 512)
    assert len(features) == 6 and not refused


def test_label_reader_asks_again_after_a_tokenizer_outage(tiny_lm):
    """The tokenize endpoint fails once (HTTP 500): that read falls back to prefix matching and nothing is
    kept, so the next read gets the served tokens; a server without the endpoint is asked once only."""
    from compeff.evaluate.eval_stage import _first_pieces
    from compeff.synth.label_answers import LabelReader

    labels = ["negative", "positive"]
    with FakeServer(tokenizer=tiny_lm, faults=FaultPlan(tokenize_fail_first=2)) as srv:
        recipe = load_recipe(None, ["teacher.backend=openai", f"teacher.base_urls=[{srv.base_url}]"])
        reader = LabelReader(recipe)
        assert reader.owners(labels) is None  # the outage: prefix matching for this read
        owners = reader.owners(labels)
        assert owners is not None and owners["negative"] == 0 and owners["positive"] == 1
    with FakeServer() as srv:  # no tokenize endpoint: that answer is remembered
        assert _first_pieces(srv.base_url, "m", tuple(labels), None) is None
        asked = srv.stats.requests
        assert _first_pieces(srv.base_url, "m", tuple(labels), None) is None
        assert srv.stats.requests == asked


def test_llama_servers_own_dialect_is_not_taken_for_vllms(tmp_path, tiny_lm):
    """llama.cpp's own server (llama-server) answers vLLM's /tokenize body, which has no ``content``,
    with 200 ``{"tokens": []}``: empty ids for a non-empty text mean "not this dialect", so the served
    tokenizer is fingerprinted in llama.cpp's dialect, matches the student's, and generate keeps the ids
    the entries carry without asking for vLLM's return_tokens_as_token_ids."""
    from compeff.synth.generate import run_generate_stage
    from compeff.teachers.tokenize_api import served_first_pieces, served_vocabulary

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    bodies = []

    def responder(messages, body):
        bodies.append(body)
        return ANSWER

    with FakeServer(tokenizer=tiny_lm, tokenize_dialect="llama.cpp", responder=responder) as srv:
        served = served_vocabulary(srv.base_url, "teacher")
        assert served is not None and served.dialect == "llama.cpp"
        assert served.fingerprint == top_logprobs.tokenizer_probe_fingerprint(tokenizer)
        assert served_first_pieces(srv.base_url, "teacher", ["negative"]) == {
            "negative": tokenizer.decode(tokenizer("negative", add_special_tokens=False)["input_ids"][:1])
        }
        recipe = load_recipe(write_recipe(tmp_path, srv.base_url, tiny_lm))
        run_generate_stage(recipe, progress=False)
    rows = list(iter_jsonl(recipe.run_dir / "generate" / "data.jsonl"))
    assert len(rows) == 6 and len(bodies) == 6
    assert not any(b.get("return_tokens_as_token_ids") for b in bodies)
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    for row in rows:
        field = row[top_logprobs.FIELD]
        assert field["vocab"] == served.fingerprint
        assert field["unmapped"] == 0 and top_logprobs.unpack(field)[0].tolist() == ids


def test_tokenize_endpoints_are_asked_directly_not_through_http_proxy(tiny_lm, dead_proxy):
    """$HTTP_PROXY names a dead port: urllib's default opener would send even 127.0.0.1 there (and the
    outage would refuse the teacher); compeff's calls to the server's tokenize endpoints go direct."""
    from compeff.teachers.tokenize_api import served_first_pieces, served_vocabulary

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    with FakeServer(tokenizer=tiny_lm) as srv:
        served = served_vocabulary(srv.base_url, "teacher")
        pieces = served_first_pieces(srv.base_url, "teacher", ["positive"])
        asked = srv.stats.tokenize_calls
    assert served is not None and served.dialect == "vllm" and asked > 0
    assert served.fingerprint == top_logprobs.tokenizer_probe_fingerprint(tokenizer)
    assert pieces is not None and set(pieces) == {"positive"}
