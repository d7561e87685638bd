"""A scripted responder for the loopback server: well-formed (and, on purpose, some malformed) answers
to every compeff prompt, chosen deterministically from the prompt. Tests and benchmarks use it to
drive whole stages over real HTTP without a real LLM.
"""

from __future__ import annotations

import hashlib
import json
import re

IDEAS = [
    {
        "name": "sarcasm detection",
        "type": "closed_classification",
        "description": "Decide whether the text is sarcastic.",
    },
    {
        "name": "sarcasm presence check",
        "type": "closed_classification",
        "description": "Decide whether the text is sarcastic or not.",
    },
    {
        "name": "intensity rating",
        "type": "rating",
        "description": "Rate how intense the feelings in the text are from 1 to 5.",
    },
    {
        "name": "which review is happier",
        "type": "closed_classification",
        "description": "Compare two reviews and say which is happier.",
    },
    {
        "name": "emotion profile",
        "type": "structured",
        "description": "Describe the main emotion of the text as JSON.",
    },
    {
        "name": "praise spans",
        "type": "extraction",
        "description": "Copy the phrases of the text that praise something.",
    },
]
SCHEMA = {
    "type": "object",
    "properties": {"emotion": {"type": "string"}, "strength": {"type": "integer"}},
    "required": ["emotion", "strength"],
}


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _definition(name: str, kind: str, prompt: str) -> str:
    base = {"name": name, "type": kind, "labels": None, "copy_exact": None, "json_schema": None}
    if kind == "closed_classification":
        labels = ["sarcastic", "not sarcastic"]
        examples = [{"input": f"example text {i}", "output": labels[i % 2]} for i in range(9)]
        examples.append({"input": "off-format example", "output": "maybe"})  # outside the label set
        base.update(
            instruction=f"Decide for {name}: is the text sarcastic?", output_format="one label", labels=labels
        )
    elif kind == "rating":
        examples = [{"input": f"text {i}", "output": str(1 + i % 5)} for i in range(8)]
        base.update(
            instruction="Rate the intensity of feeling from 1 to 5.", output_format="a number from 1 to 5"
        )
    elif kind == "structured":
        examples = [{"input": f"text {i}", "output": {"emotion": "joy", "strength": i}} for i in range(8)]
        base.update(
            instruction="Give the main emotion and its strength.",
            output_format="JSON object",
            json_schema=SCHEMA,
        )
    else:
        examples = [{"input": f"I love text {i}", "output": "love"} for i in range(3)]  # too few: rejected
        base.update(instruction="Copy praising phrases.", output_format="list of spans", copy_exact=True)
    base["examples"] = examples
    text = json.dumps(base)
    if _h(prompt) % 4 == 0:  # sometimes in a code fence with prose around it
        text = f"Here is the definition:\n```json\n{text}\n```\nHope this helps."
    return text


def _answer_task(prompt: str) -> str:
    labels = re.search(r"^Allowed labels: (.+)$", prompt, re.MULTILINE)
    if labels:
        options = [x.strip() for x in labels.group(1).split(",")]
        if _h(prompt) % 10 == 0:
            return "I am not sure."  # off the label set: QC drops it
        return options[_h(prompt) % len(options)]
    if "JSON schema:" in prompt:
        return json.dumps({"emotion": "joy", "strength": _h(prompt) % 5})
    if "from 1 to 5" in prompt:
        return str(1 + _h(prompt) % 5)
    return "The text expresses a mixed attitude, mostly positive, with a hint of irony."


def pipeline_responder(messages: list[dict], body: dict) -> str:
    """Answer any compeff prompt in the shape its parser expects (malformed now and then, on purpose)."""
    prompt = str(messages[-1].get("content", ""))
    if prompt.startswith("Read the text below and brainstorm"):
        names = ["Tone", "Sarcasm", "Emotional intensity", "Praise", "Rating"]
        k = 2 + _h(prompt) % 3
        return "\n".join(
            f"{i}. **{n}**: what {n.lower()} means. Value: high" for i, n in enumerate(names[:k], 1)
        )
    if prompt.startswith("You design instructions for analysing"):
        return json.dumps(
            [
                "Analyse how the writer's attitude shows in the text.",
                "Describe the emotional arc of the text.",
            ]
        )
    if prompt.startswith("You design sentiment-analysis tasks"):
        if _h(prompt) % 7 == 3:
            return "Sorry, I cannot produce tasks for this."  # unparseable: goes to failures.jsonl
        return json.dumps(IDEAS) + ("," if _h(prompt) % 2 else "")
    if prompt.startswith("Turn this task idea into"):
        match = re.search(r"^Task idea: (.+) \((\w+)\)$", prompt, re.MULTILINE)
        name, kind = (match.group(1), match.group(2)) if match else ("task", "rating")
        return _definition(name, kind, prompt)
    if prompt.startswith("Here is a task:"):
        roll = _h(prompt) % 8
        if roll == 0:
            return "[{'input': 'only one', 'output': 'x'}]"  # not two examples
        labels = re.search(r"^Allowed labels: (.+)$", prompt, re.MULTILINE)
        if labels:
            options = [x.strip() for x in labels.group(1).split(",")]
            outs = [
                options[0],
                options[-1] if roll != 1 else "undecided",
            ]  # roll 1: one demo off the label set
        elif "JSON object" in prompt:
            outs = [
                json.dumps({"emotion": "anger", "strength": 2}),
                json.dumps({"emotion": "joy", "strength": 4}),
            ]
        else:
            outs = ["2", "5"]
        pair = [
            {"input": f"new text {roll} a", "output": outs[0]},
            {"input": f"new text {roll} b", "output": outs[1]},
        ]
        return json.dumps(pair)
    return _answer_task(prompt)


RESPONDERS = {"echo": None, "pipeline": pipeline_responder}
