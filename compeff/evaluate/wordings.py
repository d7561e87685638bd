"""Prompt wordings of the ruler: several ways of asking one model for one sentiment label.

A small model's label depends heavily on how it is asked (SmolLM2-135M on the same IMDb reviews: 52 to
79% by wording), so ``compeff eval`` scores every model on several wordings and reports each one and the
mean with its spread: the mean measures the model, a single wording mostly measures the wording. A
wording renders the user turn (the question and the text); for models without a chat template the cue
(``Answer:``) is added after it, where the label is due.

The built-in zero-shot wordings were written for the ruler and are not used by any seed task of
:mod:`compeff.synth.seed_tasks`; "instruction" and "author" share no sentence with any seed wording,
while "question" and "text-first" end as the polarity seed wordings do ("Answer with one word."), so a
distilled student's scores on the first two are on phrasings it never saw. Users add their own in ``eval.wordings`` (``{name, template}``; ``{text}`` and
``{labels}`` / ``{labels_or}`` are filled in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

KSHOT_INSTRUCTION = "Classify the sentiment of the text as one of: {labels}."


@dataclass(frozen=True)
class Wording:
    """One way of asking for a label: a template with ``{text}`` and ``{labels}`` / ``{labels_or}``;
    ``k_shot`` wordings take demonstrations (drawn per seed) and use ``cue`` as their answer prefix."""

    name: str
    template: str
    k_shot: bool = False
    cue: str = "Answer"

    def render(self, text: str, label_names: Sequence[str], demos: Sequence[tuple[str, str]] = ()) -> str:
        """The user turn for one text (demos, if any, rendered as a k-shot list above it)."""
        labels = ", ".join(label_names)
        labels_or = f"{', '.join(label_names[:-1])} or {label_names[-1]}" if len(label_names) > 1 else labels
        if not self.k_shot:
            return (
                self.template.replace("{labels_or}", labels_or)
                .replace("{labels}", labels)
                .replace("{text}", text)
            )
        parts = [self.template.replace("{labels_or}", labels_or).replace("{labels}", labels), ""]
        for demo_text, label in demos:
            parts += [f"Text: {demo_text}", f"{self.cue}: {label}", ""]
        parts.append(f"Text: {text}")
        return "\n".join(parts)

    def completion_prompt(self, user_turn: str) -> str:
        """The prompt of a model read without a chat template: the user turn, then the cue."""
        return f"{user_turn}\n{self.cue}:"


BUILTIN_WORDINGS: dict[str, Wording] = {
    w.name: w
    for w in (
        Wording(
            "question",
            "Is the sentiment of this text {labels_or}? Answer with one word.\n\n{text}",
        ),
        Wording(
            "instruction",
            "Classify the sentiment of the following text as {labels_or}. Reply with a single word.\n\n"
            "Text: {text}",
        ),
        Wording(
            "text-first",
            "{text}\n\nWhat is the sentiment of the text above: {labels_or}? Answer with one word.",
        ),
        Wording(
            "author",
            "Read this text and tell me whether its author sounds {labels_or}. "
            'Use one word only.\n\n"{text}"',
        ),
        Wording("k-shot", KSHOT_INSTRUCTION, k_shot=True, cue="Sentiment"),
    )
}

ZERO_SHOT_DEFAULT = ("question", "instruction", "text-first", "author")


def default_wordings(chat_template: bool, k_shot: int) -> list[str]:
    """Zero-shot wordings for chat models; a model read without a template also gets the k-shot list."""
    names = list(ZERO_SHOT_DEFAULT)
    if not chat_template and k_shot > 0:
        names.append("k-shot")
    return names


def resolve_wordings(specs: Sequence[str | dict] | None, chat_template: bool, k_shot: int) -> list[Wording]:
    """The wordings an evaluation uses: built-in names or ``{name, template, k_shot?, cue?}`` entries
    (the recipe schema has checked them); None gives :func:`default_wordings`."""
    out: list[Wording] = []
    for spec in specs if specs is not None else default_wordings(chat_template, k_shot):
        if isinstance(spec, str):
            out.append(BUILTIN_WORDINGS[spec])
        else:
            out.append(
                Wording(
                    spec["name"],
                    spec["template"],
                    bool(spec.get("k_shot", False)),
                    spec.get("cue") or "Answer",
                )
            )
    return out
