"""The attribute parser on hand-written teacher answers of many shapes, and the normalisation rules."""

from __future__ import annotations

import pytest

from compeff.synth.attributes import (
    AttributeParseError,
    count_attributes,
    min_count_threshold,
    normalise_name,
    parse_attributes,
)

# (answer, expected [(name, description, value)])
SHAPES = [
    (  # 1 the prompt's own format
        "1. **Tone**: The overall attitude of the writer. Value: negative\n2. **Sarcasm**: Saying the opposite of what is meant. Value: strong",
        [
            ("Tone", "The overall attitude of the writer.", "negative"),
            ("Sarcasm", "Saying the opposite of what is meant.", "strong"),
        ],
    ),
    (  # 2 ")" numbers, dash separator, value in parentheses
        "1) Tone - the attitude of the writer (Value: hostile)\n2) Emotional intensity - how strong feelings are (value: high)",
        [
            ("Tone", "the attitude of the writer", "hostile"),
            ("Emotional intensity", "how strong feelings are", "high"),
        ],
    ),
    (  # 3 dash bullets with bold
        "- **Tone:** attitude of the text\n- **Humor:** jokes and wit",
        [("Tone", "attitude of the text", ""), ("Humor", "jokes and wit", "")],
    ),
    (  # 4 star bullets, plain names
        "* Tone: attitude\n* Subjectivity: opinion versus fact",
        [("Tone", "attitude", ""), ("Subjectivity", "opinion versus fact", "")],
    ),
    (  # 5 prose before and after, blank lines between items
        "Sure! Here are the attributes I found in the review:\n\n1. **Tone**: attitude. Value: mixed\n\n2. **Nostalgia**: longing for the past. Value: present\n\nOverall, the review is mildly positive.",
        [("Tone", "attitude.", "mixed"), ("Nostalgia", "longing for the past.", "present")],
    ),
    (  # 6 markdown headers as items, labelled sub-lines
        "## Attributes\n### 1. Tone\nDescription: attitude of the writer\nValue: negative\n### 2. Irony\nDescription: meaning the opposite\nValue: present",
        [("Tone", "attitude of the writer", "negative"), ("Irony", "meaning the opposite", "present")],
    ),
    (  # 7 indented sub-bullets with labels
        "1. **Tone**\n   - Description: attitude of the text\n   - Value: angry\n2. **Stance**\n   - Description: position taken\n   - Attribute value: against",
        [("Tone", "attitude of the text", "angry"), ("Stance", "position taken", "against")],
    ),
    (  # 8 missing descriptions
        "1. **Tone**\n2. Humor\n3. **Formality**:",
        [("Tone", "", ""), ("Humor", "", ""), ("Formality", "", "")],
    ),
    (  # 9 duplicated items are kept once (first wins)
        "1. **Tone**: attitude\n2. **Tone**: attitude again\n3. **tone**: lower case",
        [("Tone", "attitude", "")],
    ),
    (  # 10 bold-led lines without bullets
        "**Tone**: attitude of the writer\n**Emotion**: feelings expressed",
        [("Tone", "attitude of the writer", ""), ("Emotion", "feelings expressed", "")],
    ),
    (  # 11 the number inside the bold
        "**1. Tone**: attitude\n**2. Praise**: positive evaluation",
        [("Tone", "attitude", ""), ("Praise", "positive evaluation", "")],
    ),
    (  # 12 French
        "1. **Ton** : l'attitude de l'auteur. Valeur : négatif\n2. **Ironie** : dire le contraire",
        [("Ton", "l'attitude de l'auteur. Valeur : négatif", ""), ("Ironie", "dire le contraire", "")],
    ),
    (  # 13 Chinese, full-width colons
        "1. **语气**：作者的态度。\n2. **讽刺**：反语的使用。",
        [("语气", "作者的态度。", ""), ("讽刺", "反语的使用。", "")],
    ),
    (  # 14 value inside the bold name
        "1. **Tone: negative** the writer is upset\n2. **Urgency: low**",
        [("Tone", "negative the writer is upset", ""), ("Urgency", "low", "")],
    ),
    (  # 15 bullet character and en-dash
        "• Tone – attitude of the writer\n• Politeness – courtesy shown",
        [("Tone", "attitude of the writer", ""), ("Politeness", "courtesy shown", "")],
    ),
    (  # 16 descriptions running onto the next line
        "1. **Tone**: the attitude of the writer,\nwhich here is bitter. Value: bitter\n2. **Hyperbole**: exaggeration",
        [
            ("Tone", "the attitude of the writer, which here is bitter.", "bitter"),
            ("Hyperbole", "exaggeration", ""),
        ],
    ),
    (  # 17 long sentences without a name are skipped, named items kept
        "1. The writer seems to be very unhappy with the film overall\n2. **Disappointment**: unmet expectations",
        [("Disappointment", "unmet expectations", "")],
    ),
    (  # 18 names with slashes and "use of" stay raw here (normalised later)
        "1. **Use of Sarcasm/Irony**: mocking remarks. Value: heavy",
        [("Use of Sarcasm/Irony", "mocking remarks.", "heavy")],
    ),
    (  # 19 Windows line endings and underscores for bold
        "1. __Tone__: attitude\r\n2. __Emotion__: feelings\r\n",
        [("Tone", "attitude", ""), ("Emotion", "feelings", "")],
    ),
]


@pytest.mark.parametrize(("answer", "expected"), SHAPES, ids=[f"shape{i + 1}" for i in range(len(SHAPES))])
def test_parser_shapes(answer, expected):
    got = [(a.name, a.description, a.value) for a in parse_attributes(answer)]
    assert got == expected


@pytest.mark.parametrize(
    "broken",
    [
        "",
        "   \n\n",
        "I'm sorry, I cannot analyse this text.",
        "The text is negative overall and the writer is clearly upset about the ending of the movie.",
        "## Attributes\n\n",
        "1. The reviewer did not like the film at all and said so many times",
    ],
)
def test_broken_answers_raise(broken):
    with pytest.raises(AttributeParseError):
        parse_attributes(broken)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Tone", ["tone"]),
        ("TONE OF VOICE", ["tone of voice"]),
        ("Tone: negative", ["tone"]),
        ("Sarcasm/Irony", ["sarcasm", "irony"]),
        ("Use of Sarcasm", ["sarcasm"]),
        ("use of humor / Use of irony", ["humor", "irony"]),
        ("  Emotional   intensity. ", ["emotional intensity"]),
        ("Misuse of words", ["misuse of words"]),  # only a leading "use of" goes
        ("/", []),
    ],
)
def test_normalisation_rules(raw, expected):
    assert normalise_name(raw) == expected


def test_counting_once_per_text_and_most_frequent_description():
    per_text = [
        (
            "t1",
            [
                {"name": "Tone", "description": "attitude", "value": "Negative"},
                {"name": "tone: bad", "description": "x"},
            ],
        ),
        (
            "t2",
            [
                {"name": "TONE", "description": "attitude", "value": "negative"},
                {"name": "Sarcasm/Irony", "description": "mocking"},
            ],
        ),
        ("t3", [{"name": "Tone", "description": "the mood", "value": "positive"}]),
    ]
    stats = count_attributes(per_text)
    tone = stats["tone"].to_record()
    assert tone["count"] == 3 and tone["text_ids"] == ["t1", "t2", "t3"]
    assert tone["description"] == "attitude" and tone["example_values"][0] == "negative"
    assert stats["sarcasm"].count == stats["irony"].count == 1


def test_min_count_threshold():
    assert min_count_threshold(20000, 10, None) == 10
    assert min_count_threshold(20, 10, 0.1) == 2
    assert min_count_threshold(20, 10, 0.0) == 1


def test_prompt_echoes_and_junk_names_are_dropped_and_counted():
    from compeff.prompts import load_prompt
    from compeff.synth.attributes import count_attributes, drop_echoes_and_junk, prompt_echoes

    answers = [
        ("t1", [{"name": "Attribute name", "description": "x"}, {"name": "irony", "description": "y"}]),
        ("t2", [{"name": "attribute name", "description": "x"}, {"name": "2", "description": ""}]),
        ("t3", [{"name": "Tone", "description": "z"}, {"name": "the", "description": ""}, {"name": "irony"}]),
    ]
    echoes = prompt_echoes(load_prompt("enumerate"))
    assert {"attribute name", "tone"} <= echoes
    kept, dropped = drop_echoes_and_junk(count_attributes(answers), echoes)
    assert set(kept) == {"irony"} and kept["irony"].count == 2
    assert dropped == {"echoes": 2, "echo_mentions": 3, "junk": 2, "junk_mentions": 2}


def test_json_answers_parse_like_lists():
    from compeff.synth.attributes import parse_attributes

    answer = (
        '{"attributes": [{"name": "Irony", "description": "saying the opposite", "value": "strong"},'
        ' {"name": "irony", "description": "dup", "value": "x"}, {"name": "pacing", "description": "speed", "value": "slow"}]}'
    )
    items = parse_attributes(answer)
    assert [(i.name, i.description, i.value) for i in items] == [
        ("Irony", "saying the opposite", "strong"),
        ("pacing", "speed", "slow"),
    ]
    with pytest.raises(AttributeParseError):
        parse_attributes('{"attributes": []}')
    # cut at max_tokens, with a raw newline inside a string (llama.cpp's grammar lets it through): the
    # whole items are kept, the cut one is not
    cut = '{"attributes": [{"name": "plot", "description": "the story\nline", "value": "thin"}, {"name": "act'
    assert [(i.name, i.value) for i in parse_attributes(cut)] == [("plot", "thin")]


def test_both_enumerate_prompts_render():
    from compeff.prompts import render_prompt

    assert '{"attributes": [{"name"' in render_prompt("enumerate_json", text="a review")
    assert "a review" in render_prompt("enumerate", text="a review")


def test_a_json_answer_cut_at_max_tokens_keeps_its_whole_items():
    from compeff.synth.attributes import parse_attributes

    cut = '{"attributes":[{"name":"irony","description":"saying the \\"opposite\\"","value":"strong"},{"name":"pac'
    assert [(i.name, i.description) for i in parse_attributes(cut)] == [("irony", 'saying the "opposite"')]
