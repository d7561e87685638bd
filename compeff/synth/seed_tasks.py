"""Canonical sentiment tasks that every run distils, whatever its teacher writes.

The teacher's own tasks come first in a real run (they follow what the user texts are about); these seed
tasks, in the spirit of SentiBench's categories, guarantee that the basics are always in the distillation
set: polarity (2- and 3-way), a 1-5 rating, emotion, irony and subjectivity. Each is a closed task with a
label set and several instruction wordings; a sample uses one wording (drawn from its id), so the student
learns the task rather than one phrasing. Their answers are read as label distributions
(:mod:`compeff.synth.label_answers`), not sampled text.

None of these wordings is one of the ruler's (:mod:`compeff.evaluate.wordings`), but they are not all
far from it: the first polarity wordings ask as the ruler's "question" does with one word changed, and
share its closing "Answer with one word." with "question" and "text-first"; the ruler's "instruction"
and "author" wordings share no sentence with any seed wording (tested), so those two measure a student
on phrasings it never saw. Users add tasks of their own with ``tasks.seed_tasks_file`` (JSONL or YAML:
``name``, ``labels``, ``wordings`` with ``{text}`` and ``{labels_or}`` / ``{labels}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compeff.data import DataError

SEED_TASKS: dict[str, dict[str, Any]] = {
    # polarity wordings chosen on training splits (IMDb train, TweetEval validation; never test data) by
    # how often SmolLM2-135M-Instruct answers them right: docs/benchmarks.md, "Seed wordings"
    "polarity": {
        "labels": ["negative", "positive"],
        "wordings": [
            "Is the opinion in this text {labels_or}? Answer with one word.\n\n{text}",
            "Is this review {labels_or}? Answer with one word.\n\n{text}",
            "How does the writer feel about what they describe: {labels_or}? Answer with one word.\n\n{text}",
        ],
    },
    "polarity3": {
        "labels": ["negative", "neutral", "positive"],
        "wordings": [
            "Is the opinion in this post {labels_or}? Answer with one word.\n\n{text}",
            "How does the writer feel about what they describe: {labels_or}? Answer with one word.\n\n{text}",
            "Label the polarity of this post as {labels_or}. Give only the label.\n\nPost: {text}",
        ],
    },
    "rating": {
        "labels": ["1", "2", "3", "4", "5"],
        "wordings": [
            "Rate how much the writer likes what they describe, from 1 (not at all) to 5 (very much). "
            "Give only the number.\n\nText: {text}",
            "Text: {text}\n\nOn a scale of {labels_or}, how favourable is this text? Respond with one digit.",
        ],
    },
    "emotion": {
        "labels": ["anger", "joy", "optimism", "sadness"],
        "wordings": [
            "Which emotion does this text express most: {labels_or}? Give only the emotion.\n\nText: {text}",
            "Text: {text}\n\nName the dominant emotion ({labels}). Respond with that word alone.",
        ],
    },
    "irony": {
        "labels": ["yes", "no"],
        "wordings": [
            "Is this text ironic or sarcastic? Reply {labels_or}.\n\nText: {text}",
            "Text: {text}\n\nDoes the writer mean the opposite of what they literally say ({labels_or})?",
        ],
    },
    "subjectivity": {
        "labels": ["subjective", "objective"],
        "wordings": [
            "Is this text {labels_or}: does it state opinions or facts? Give only the label.\n\nText: {text}",
            "Text: {text}\n\nLabel the text as {labels_or}. Respond with the label alone.",
        ],
    },
}


def fill(wording: str, labels: list[str], text: str) -> str:
    """A seed-task wording with its labels and text filled in."""
    labels_or = f"{', '.join(labels[:-1])} or {labels[-1]}" if len(labels) > 1 else labels[0]
    return (
        wording.replace("{labels_or}", labels_or)
        .replace("{labels}", ", ".join(labels))
        .replace("{text}", text)
    )


def load_seed_file(path: str) -> dict[str, dict[str, Any]]:
    """Extra seed tasks from a JSONL or YAML file (a list of ``{name, labels, wordings}``)."""
    import json

    import yaml

    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"tasks.seed_tasks_file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"tasks.seed_tasks_file: {path} is not UTF-8 text") from None
    try:
        items = (
            [json.loads(line) for line in raw.splitlines() if line.strip()]
            if p.suffix == ".jsonl"
            else yaml.safe_load(raw)
        )
    except (ValueError, yaml.YAMLError) as exc:
        raise DataError(
            f"tasks.seed_tasks_file: {path} is not valid {p.suffix[1:] or 'YAML'}: {exc}"
        ) from None
    if not isinstance(items, list):
        raise DataError(f"tasks.seed_tasks_file: {path} must hold a list of tasks")
    out = {}
    for n, item in enumerate(items, 1):
        where = f"tasks.seed_tasks_file: {path}, task {n}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise DataError(f"{where}: needs a name")
        labels, wordings = item.get("labels"), item.get("wordings")
        if (
            not isinstance(labels, list)
            or len(labels) < 2
            or not all(isinstance(x, str) and x.strip() for x in labels)
            or len({x.strip().lower() for x in labels}) != len(labels)
        ):
            raise DataError(f"{where} ({item['name']}): labels must be a list of at least two distinct words")
        if (
            not isinstance(wordings, list)
            or not wordings
            or not all(isinstance(w, str) and "{text}" in w for w in wordings)
        ):
            raise DataError(f"{where} ({item['name']}): wordings must be a list of strings with {{text}}")
        out[item["name"]] = {"labels": labels, "wordings": wordings}
    return out


def seed_task_rows(names: list[str], extra_file: str | None = None) -> list[dict[str, Any]]:
    """The chosen seed tasks as tasks.jsonl rows (closed classification, no demos, several wordings)."""
    library = dict(SEED_TASKS)
    chosen = list(names)
    if extra_file:
        extra = load_seed_file(extra_file)
        library.update(extra)
        chosen += [n for n in extra if n not in chosen]
    rows = []
    for name in chosen:
        task = library[name]
        labels = task["labels"]
        rows.append(
            {
                "id": f"seed:{name}",
                "perspective_id": -1,
                "perspective": "seed",
                "name": name,
                "type": "closed_classification",
                "description": task["wordings"][0],
                "wordings": task["wordings"],
                "output_format": "one label word",
                "labels": labels,
                "copy_exact": None,
                "json_schema": None,
                "examples": [],
                "demos": [],
                "merged_from": [],
                "source": "seed",
            }
        )
    return rows
