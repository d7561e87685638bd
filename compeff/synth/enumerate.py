"""``compeff enumerate``: the teacher names the sentiment-related attributes of each user text.

Writes ``enumerate/data.jsonl`` (one record per text: raw answer and parsed items),
``failures.jsonl`` (failed calls and unparseable answers, with the raw text) and
``attributes.jsonl`` (normalised names with description, count, example values and text ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compeff.config import Recipe
from compeff.data import DataError, resolve_source, select_user_texts
from compeff.progress import console
from compeff.prompts import load_prompt, render_prompt
from compeff.runs import Stage, iter_jsonl
from compeff.synth import answer_schemas
from compeff.synth.attributes import (
    AttributeParseError,
    count_attributes,
    drop_echoes_and_junk,
    min_count_threshold,
    parse_attributes,
    prompt_echoes,
)
from compeff.teachers import ChatRequest, TeacherResult, sampling_params
from compeff.teaching import AnswerRejected, answer_requests, teacher_identity, teacher_session

ATTRIBUTES_FILE = "attributes.jsonl"


def prompt_name(recipe: Recipe) -> str:
    """The enumerate prompt: JSON answers when the teacher's output is constrained, else a numbered list."""
    return "enumerate_json" if recipe.teacher.structured_output else "enumerate"


def build_requests(texts: list[dict[str, Any]], recipe: Recipe) -> list[ChatRequest]:
    """One enumerate request per text (long texts cut to ``enumerate.max_chars``)."""
    params = sampling_params(recipe.teacher, schema=answer_schemas.ATTRIBUTES)
    limit = recipe.enumerate.max_chars
    name = prompt_name(recipe)
    return [
        ChatRequest(
            id=t["id"],
            messages=[{"role": "user", "content": render_prompt(name, text=t["text"][:limit])}],
            params=params,
            meta={"source": t["source"]},
        )
        for t in texts
    ]


def write_attributes(stage: Stage, n_texts: int, recipe: Recipe) -> dict[str, Any]:
    """Aggregate every parsed answer in the stage into attributes.jsonl; returns summary counts."""
    per_text = ((r["id"], r["attributes"]) for r in iter_jsonl(stage.data_path))
    echoes = prompt_echoes(load_prompt(prompt_name(recipe)))
    stats, dropped = drop_echoes_and_junk(count_attributes(per_text), echoes)
    threshold = min_count_threshold(n_texts, recipe.enumerate.min_count, recipe.enumerate.min_frac)
    kept = sorted((s for s in stats.values() if s.count >= threshold), key=lambda s: (-s.count, s.name))
    stage.write_artifact(
        ATTRIBUTES_FILE, "".join(json.dumps(s.to_record(), ensure_ascii=False) + "\n" for s in kept)
    )
    return {
        "distinct_attributes": len(stats),
        "kept_attributes": len(kept),
        "min_count_used": threshold,
        "dropped_names": dropped,
    }


def run_enumerate_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Select user texts, ask the teacher for their attributes, parse, normalise and count them."""
    sources = recipe.data.user_texts
    for spec in sources:
        resolve_source(spec, recipe.data.dir)  # a missing source fails before any model loads
    texts, reports = select_user_texts(
        sources, recipe.enumerate.n_texts, recipe.run.seed, recipe.data.text_field, recipe.data.dir
    )
    if not texts:
        raise DataError(f"data.user_texts: no usable text in {', '.join(sources)}")
    inputs = {spec: str(resolve_source(spec, recipe.data.dir)) for spec in sources}
    config = {
        "enumerate": recipe.enumerate.model_dump(exclude={"min_count", "min_frac"}),
        "teacher": teacher_identity(recipe.teacher),
        "seed": recipe.run.seed,
        "text_field": recipe.data.text_field,
        "prompt": load_prompt(prompt_name(recipe)),
    }
    stage = Stage.open(recipe.run_dir, "enumerate", config=config, inputs=inputs, force=force)
    with stage:
        requests = build_requests(texts, recipe)
        pending = stage.pending(requests)
        if pending:
            with teacher_session(recipe.teacher, seed=recipe.run.seed) as (teacher, cache):

                def to_record(request: ChatRequest, result: TeacherResult) -> dict[str, Any]:
                    try:
                        items = parse_attributes(result.text)
                    except AttributeParseError as exc:
                        raise AnswerRejected(str(exc)) from None
                    return {
                        "id": request.id,
                        "source": request.meta["source"],
                        "answer": result.text,
                        "attributes": [vars(item) for item in items],
                        "usage": result.usage,
                    }

                counts = answer_requests(stage, teacher, pending, to_record, cache=cache, progress=progress)
                stage.extra["teacher_usage"] = teacher.usage.to_dict()
                stage.extra["call"] = counts
        summary = write_attributes(stage, len(texts), recipe)
        stage.extra.update(
            texts=len(texts),
            texts_per_source={spec: sum(t["source"] == spec for t in texts) for spec in sources},
            load_problems=sum(len(r.problems) for r in reports),
            **summary,
        )
        console.print(
            f"enumerate: {stage.n_ok}/{len(texts)} texts parsed, {summary['distinct_attributes']} distinct attributes "
            f"({summary['dropped_names']['echoes']} prompt echoes and {summary['dropped_names']['junk']} junk names dropped), "
            f"{summary['kept_attributes']} seen >= {summary['min_count_used']} times -> {stage.folder / ATTRIBUTES_FILE}"
        )
    assert stage.manifest is not None
    return stage.manifest


def attributes_path(recipe: Recipe) -> Path:
    """Where cluster reads attributes: cluster.input, or the run's enumerate/attributes.jsonl."""
    return (
        Path(recipe.cluster.input) if recipe.cluster.input else recipe.run_dir / "enumerate" / ATTRIBUTES_FILE
    )
