"""Format lessons for the built-in tiny chat LM: synthetic (prompt, answer) pairs in the shapes that
compeff's prompts ask for, so the offline quickstart's teacher answers in a parseable form.

The content is drawn at random from small banks written here; it says nothing about the text it is
paired with. It teaches format, not sentiment.
"""

from __future__ import annotations

import random

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
WORDS = [
    "the",
    "movie",
    "film",
    "story",
    "acting",
    "plot",
    "was",
    "is",
    "great",
    "terrible",
    "boring",
    "wonderful",
    "awful",
    "good",
    "bad",
    "love",
    "hate",
    "ending",
    "music",
    "cast",
    "scene",
    "director",
    "show",
    "game",
    "team",
    "day",
    "night",
    "people",
    "life",
    "today",
    "really",
    "very",
    "so",
    "not",
    "sentiment",
    "positive",
    "negative",
    "neutral",
    "tone",
    "emotion",
    "review",
    "tweet",
    "user",
    "text",
    "sarcasm",
    "irony",
    "praise",
    "anger",
    "joy",
    "sadness",
    "fear",
    "surprise",
    "attribute",
    "perspective",
    "task",
    "label",
    "answer",
    "rating",
    "score",
    "extract",
    "json",
    "format",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "it",
    "this",
    "that",
    "i",
    "you",
    "we",
    "they",
    "my",
    "your",
]


def random_text(rng: random.Random) -> str:
    """A nonsense 'user text' made of common review and tweet words."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))


def enumerate_lesson(rng: random.Random) -> list[dict[str, str]]:
    """One chat: the enumerate prompt on a random text, answered with a numbered bold list."""
    from compeff.prompts import render_prompt

    items = rng.sample(ATTRIBUTE_BANK, rng.randint(3, 6))
    answer = "\n".join(
        f"{k}. **{name.capitalize()}**: {description}. Value: {rng.choice(VALUES)}."
        for k, (name, description) in enumerate(items, 1)
    )
    return [
        {"role": "user", "content": render_prompt("enumerate", text=random_text(rng))},
        {"role": "assistant", "content": answer},
    ]


LESSONS = [enumerate_lesson]


def lessons(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """n chats drawn from every lesson kind in turn."""
    rng = random.Random(seed)
    return [LESSONS[i % len(LESSONS)](rng) for i in range(n)]


def lesson_corpus(n: int = 400, seed: int = 1) -> list[str]:
    """Plain text of lessons, for training the tiny tokenizer on the words it will need."""
    return [m["content"] for chat in lessons(n, seed) for m in chat]
