"""Structured output: the openai backend sends the schema in the server's dialect, the hf backend
constrains decoding with xgrammar so that even a random model answers in valid JSON."""

from __future__ import annotations

import json

import pytest

from compeff.config import load_recipe
from compeff.teachers import ChatRequest, SamplingParams, sampling_params
from compeff.teachers.fake_server import FakeServer
from compeff.teachers.openai_api import OpenAITeacher

SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative"]}, "stars": {"type": "integer"}},
    "required": ["label", "stars"],
}


def _request(params: SamplingParams, i: int = 0) -> ChatRequest:
    return ChatRequest(id=f"r{i}", messages=[{"role": "user", "content": f"rate review {i}"}], params=params)


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("json_schema", {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}),
        ("json_object", {"type": "json_object", "schema": SCHEMA}),
    ],
)
def test_the_openai_backend_sends_the_schema_in_the_servers_dialect(style, expected):
    seen = []

    def responder(messages, body):
        seen.append(body.get("response_format"))
        return '{"label": "positive", "stars": 5}'

    settings = load_recipe(overrides=[f"teacher.response_format={style}"]).teacher
    with FakeServer(responder=responder) as srv:
        teacher = OpenAITeacher("fake", base_urls=srv.base_url, response_format=style)
        params = sampling_params(settings, schema=SCHEMA)
        plain = sampling_params(settings)
        results = list(teacher.generate([_request(params, 0), _request(plain, 1)]))
        teacher.close()
    assert all(r.ok for r in results)
    assert sorted(seen, key=lambda f: f is None) == [expected, None]


def test_structured_output_off_sends_no_schema():
    settings = load_recipe(overrides=["teacher.structured_output=false"]).teacher
    assert sampling_params(settings, schema=SCHEMA).json_schema is None


def test_a_random_model_answers_in_valid_json_under_the_hf_grammar(tiny_lm):
    pytest.importorskip("xgrammar")
    from compeff.teachers.hf_local import HFTeacher

    teacher = HFTeacher(str(tiny_lm), batch_size=4)
    settings = load_recipe(overrides=["teacher.max_tokens=60", "teacher.temperature=0.9"]).teacher
    teacher.seed = 3
    constrained = sampling_params(settings, schema=SCHEMA)
    results = list(teacher.generate([_request(constrained, i) for i in range(6)]))
    assert len(results) == 6 and all(r.ok for r in results)
    for r in results:
        value = json.loads(r.text)
        assert value["label"] in ("positive", "negative") and isinstance(value["stars"], int), r.text
    free = list(teacher.generate([_request(sampling_params(settings), 9)]))
    with pytest.raises(ValueError):
        json.loads(free[0].text)  # the same model without the grammar: noise
