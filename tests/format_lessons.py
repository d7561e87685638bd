"""Format lessons for the built-in tiny chat LM: synthetic (prompt, answer) pairs in the shapes that
compeff's prompts ask for, so the offline quickstart's teacher answers in a parseable form.

The content is drawn at random from small banks written here; it says nothing about the text it is
paired with. It teaches format, not sentiment.
"""

from __future__ import annotations

import random

from compeff.models import CORPUS_WORDS

ATTRIBUTE_BANK: list[tuple[str, str]] = [
    ("tone", "the overall attitude the writer takes"),
    ("tone of voice", "how the writing sounds when read aloud"),
    ("emotional intensity", "how strongly feelings are expressed"),
    ("sarcasm", "saying the opposite of what is meant to mock"),
    ("irony", "a gap between what is said and what is meant"),
    ("humor", "attempts to amuse the reader"),
    ("rating", "an explicit score or grade given"),
    ("score", "a number that sums up the judgement"),
    ("praise", "positive evaluation of something"),
    ("criticism", "negative evaluation of something"),
    ("disappointment", "expectations that were not met"),
    ("excitement", "eager and energetic feeling"),
    ("nostalgia", "fond longing for the past"),
    ("frustration", "annoyance at being blocked or let down"),
    ("anger", "strong displeasure or hostility"),
    ("joy", "happiness and delight"),
    ("sadness", "sorrow or unhappiness"),
    ("fear", "worry about a threat"),
    ("surprise", "reaction to something unexpected"),
    ("formality", "how formal or casual the language is"),
    ("politeness", "courtesy shown to others"),
    ("subjectivity", "opinion rather than fact"),
    ("certainty", "how sure the writer sounds"),
    ("recommendation", "advice to others to try or avoid something"),
    ("comparison", "judging something against another thing"),
    ("exaggeration", "overstating for effect"),
    ("hyperbole", "deliberate overstatement"),
    ("urgency", "a sense that something must happen soon"),
    ("empathy", "understanding of others' feelings"),
    ("stance", "the position taken on an issue"),
    ("personal experience", "reference to the writer's own life"),
    ("use of emojis", "pictographs that carry feeling"),
    ("use of rhetorical questions", "questions asked for effect"),
    ("profanity", "offensive or vulgar words"),
    ("mood", "the prevailing emotional atmosphere"),
]
VALUES = ["positive", "negative", "mixed", "neutral", "strong", "mild", "present", "absent", "high", "low"]
WORDS = CORPUS_WORDS


def _noise_word(rng: random.Random) -> str:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
    return word.capitalize() + rng.choice(["", "", ",", ".", "!", "'s"]) if rng.random() < 0.3 else word


def random_text(rng: random.Random, longest: int = 30, noise: float = 0.0) -> str:
    """A nonsense 'user text' made of common review and tweet words; ``noise`` is the share of random
    letter strings mixed in, so that real texts with words never seen in lessons look familiar."""
    n = rng.randint(6, longest)
    return " ".join(_noise_word(rng) if rng.random() < noise else rng.choice(WORDS) for _ in range(n))


def enumerate_lesson(rng: random.Random) -> list[dict[str, str]]:
    """One chat: the enumerate prompt on a random text, answered with a numbered bold list."""
    from compeff.prompts import render_prompt

    items = rng.sample(ATTRIBUTE_BANK, rng.randint(3, 6))
    answer = "\n".join(
        f"{k}. **{name.capitalize()}**: {description}. Value: {rng.choice(VALUES)}."
        for k, (name, description) in enumerate(items, 1)
    )
    return [
        {"role": "user", "content": render_prompt("enumerate", text=random_text(rng, 110, noise=0.5))},
        {"role": "assistant", "content": answer},
    ]


# ------------------------------------------------------------------ tasks and answers
# A few canned tasks, one or two per task type: the tiny model learns to propose, standardise, demonstrate
# and answer these. Outputs are drawn at random and are valid for the task's format, never correct.
TASK_BANK: list[dict] = [
    {"name": "sentiment polarity", "type": "closed_classification",
     "description": "Decide the overall sentiment of the text.",
     "output_format": "one label", "labels": ["positive", "negative", "neutral"]},
    {"name": "sarcasm detection", "type": "closed_classification",
     "description": "Decide whether the text is sarcastic.",
     "output_format": "one label", "labels": ["sarcastic", "not sarcastic"]},
    {"name": "intensity rating", "type": "rating",
     "description": "Rate how strong the feeling in the text is.",
     "output_format": "a number from 1 to 5"},
    {"name": "emotion naming", "type": "open_classification",
     "description": "Name the main emotion of the text in one word.",
     "output_format": "one word"},
    {"name": "opinion words", "type": "extraction",
     "description": "Extract the words that carry the opinion.",
     "output_format": "the words, separated by commas", "copy_exact": False},
    {"name": "sentiment summary", "type": "structured",
     "description": "Summarise the sentiment of the text as JSON.",
     "output_format": "a JSON object with sentiment and score",
     "json_schema": {"type": "object", "properties": {"sentiment": {"type": "string"},
                                                      "score": {"type": "integer"}},
                     "required": ["sentiment", "score"]}},
]  # fmt: skip
EMOTIONS = ["joy", "anger", "sadness", "fear", "surprise", "disgust", "trust", "calm"]
ANALYSIS_BANK = [
    "Describe the tone of the text and what creates it.",
    "Explain which words carry the strongest feeling.",
    "Analyse how the writer's attitude changes over the text.",
    "Discuss whether the text sounds sincere or ironic.",
    "Describe the emotions the text shows and how strongly.",
    "Explain what the writer wants the reader to feel.",
]


def task_output(task: dict, rng: random.Random, text: str = "") -> str:
    """A random answer that fits a canned task's format (a label, a number, a word, copied words, JSON)."""
    kind = task["type"]
    if kind == "closed_classification":
        return rng.choice(task["labels"])
    if kind == "rating":
        return str(rng.randint(1, 5))
    if kind == "open_classification":
        return rng.choice(EMOTIONS)
    if kind == "extraction":
        words = (text or random_text(rng)).split()
        return ", ".join(rng.sample(words, min(len(words), rng.randint(1, 3))))
    sentiment = rng.choice(["positive", "negative", "neutral"])
    return _json({"sentiment": sentiment, "score": rng.randint(1, 5)})


def _short_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))


def _perspective_fields(rng: random.Random) -> dict[str, str]:
    items = rng.sample(ATTRIBUTE_BANK, rng.randint(2, 5))
    return {
        "perspective": items[0][0],
        "members": ", ".join(name for name, _ in items),
        "descriptions": "; ".join(description for _, description in items),
    }


def _json(value: object) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def analysis_lesson(rng: random.Random) -> list[dict[str, str]]:
    """The analysis-instructions prompt, answered with a JSON list of instructions."""
    from compeff.prompts import render_prompt

    n = rng.randint(1, 3)
    prompt = render_prompt("analysis", n=str(n), **_perspective_fields(rng))
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": _json(rng.sample(ANALYSIS_BANK, n))}]  # fmt: skip


def ideas_lesson(rng: random.Random) -> list[dict[str, str]]:
    """The task-ideas prompt, answered with a JSON list of canned task ideas."""
    from compeff.prompts import render_prompt

    prompt = render_prompt("task_ideas", n=str(rng.randint(2, 8)), **_perspective_fields(rng))
    ideas = [
        {k: t[k] for k in ("name", "type", "description")} for t in rng.sample(TASK_BANK, rng.randint(2, 4))
    ]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _json(ideas)}]


def standardise_lesson(rng: random.Random) -> list[dict[str, str]]:
    """The standardisation prompt for a canned idea, answered with its full definition and examples."""
    from compeff.prompts import render_prompt

    task = rng.choice(TASK_BANK)
    n = rng.randint(2, 4)
    prompt = render_prompt("task_standardise", name=task["name"], type=task["type"],
                           description=task["description"], min_examples=str(n))  # fmt: skip
    examples = []
    for _ in range(n):
        text = _short_text(rng)
        examples.append({"input": text, "output": task_output(task, rng, text)})
    definition = {
        "name": task["name"],
        "type": task["type"],
        "instruction": task["description"],
        "output_format": task["output_format"],
        "labels": task.get("labels"),
        "copy_exact": task.get("copy_exact"),
        "json_schema": task.get("json_schema"),
        "examples": examples,
    }
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _json(definition)}]


def demos_lesson(rng: random.Random) -> list[dict[str, str]]:
    """The demonstration prompt for a canned task, answered with two new input/output pairs."""
    from compeff.prompts import render_prompt
    from compeff.synth.tasks_stage import format_demos, labels_line

    task = rng.choice(TASK_BANK)
    seeds = []
    for _ in range(rng.randint(1, 2)):
        text = _short_text(rng)
        seeds.append({"input": text, "output": task_output(task, rng, text)})
    prompt = render_prompt("task_demos", instruction=task["description"], output_format=task["output_format"],
                           labels=labels_line(task), seed_demos=format_demos(seeds), text1=random_text(rng, 100, noise=0.5),
                           text2=random_text(rng, 100, noise=0.5))  # fmt: skip
    pairs = []
    for _ in range(2):
        text = _short_text(rng)
        pairs.append({"input": text, "output": task_output(task, rng, text)})
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _json(pairs)}]


def answer_lesson(rng: random.Random) -> list[dict[str, str]]:
    """A generate-stage instruction (canned task or analysis) on a random text, answered in its format."""
    from compeff.synth.instructions import render_instruction

    text = random_text(rng, 100, noise=0.5)
    if rng.random() < 0.2:
        task = {"type": "analysis", "description": rng.choice(ANALYSIS_BANK)}
        return [{"role": "user", "content": render_instruction(task, text, [])},
                {"role": "assistant", "content": _short_text(rng).capitalize() + "."}]  # fmt: skip
    task = rng.choice(TASK_BANK)
    demos = []
    for _ in range(rng.randint(0, 2)):
        demo_text = _short_text(rng)
        demos.append({"input": demo_text, "output": task_output(task, rng, demo_text)})
    return [{"role": "user", "content": render_instruction(task, text, demos)},
            {"role": "assistant", "content": task_output(task, rng, text)}]  # fmt: skip


LESSONS = [enumerate_lesson, analysis_lesson, ideas_lesson, standardise_lesson, demos_lesson, answer_lesson]


def lessons(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """n chats drawn from every lesson kind in turn."""
    rng = random.Random(seed)
    return [LESSONS[i % len(LESSONS)](rng) for i in range(n)]


def lesson_corpus(n: int = 400, seed: int = 1) -> list[str]:
    """Plain text of lessons, for training the tiny tokenizer on the words it will need."""
    return [m["content"] for chat in lessons(n, seed) for m in chat]
