"""Data loaders: short names, formats, HTML cleaning, bad rows reported with file and line."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from compeff.data import (
    SAMPLE_DIR,
    DataError,
    clean_text,
    hub_rows,
    load_labelled,
    load_texts,
    resolve_source,
    select_user_texts,
)


@pytest.fixture
def no_data_dir(monkeypatch):
    """As on a user's fresh machine: no data folder set, the hub unreachable."""
    monkeypatch.delenv("COMPEFF_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_short_names_resolve_to_the_packaged_sample(no_data_dir):
    assert resolve_source("imdb:unsupervised") == SAMPLE_DIR / "imdb" / "unsupervised.jsonl.gz"
    texts, report = load_texts("imdb:unsupervised", limit=20)
    assert len(texts) == 20 and not report.problems
    assert all("<br" not in t["text"] for t in texts)
    assert texts[0]["source"] == "imdb:unsupervised" and texts[0]["id"].startswith("unsup-unsup-")
    rows, names, _ = load_labelled("tweeteval_sentiment:validation", limit=50)
    assert names == ["negative", "neutral", "positive"] and {r["label"] for r in rows} <= {0, 1, 2}


def test_packaged_sample_is_stratified_with_unique_ids(no_data_dir):
    for spec, n_rows in [("imdb:train", 1000), ("imdb:test", 1000), ("tweeteval_sentiment:test", 4000)]:
        rows, names, report = load_labelled(spec)
        assert len(rows) == n_rows and not report.problems, spec
        assert len({r["id"] for r in rows}) == n_rows, spec
        assert {r["label"] for r in rows} == set(range(len(names))), spec
    imdb = load_labelled("imdb:test")[0]
    assert sum(r["label"] for r in imdb) == 500  # half positive
    assert (SAMPLE_DIR / "SOURCES.md").read_text().count("research use") >= 2


def test_data_folder_comes_before_the_sample(tmp_path, monkeypatch, no_data_dir):
    folder = tmp_path / "full" / "imdb"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text('{"id": "mine-0", "text": "my own review", "label": 1}\n')
    monkeypatch.setenv("COMPEFF_DATA_DIR", str(tmp_path / "full"))
    assert [r["id"] for r in load_labelled("imdb:test")[0]] == ["mine-0"]
    # a split the folder lacks falls through to the sample
    assert resolve_source("imdb:train") == SAMPLE_DIR / "imdb" / "train.jsonl.gz"
    # an explicit data.dir wins over the environment
    other = tmp_path / "other" / "imdb"
    other.mkdir(parents=True)
    (other / "test.jsonl").write_text('{"id": "other-0", "text": "another review", "label": 0}\n')
    assert [r["id"] for r in load_labelled("imdb:test", root=tmp_path / "other")[0]] == ["other-0"]


def test_unknown_split_names_every_place_tried(no_data_dir):
    with pytest.raises(DataError) as err:
        load_texts("imdb:dev")
    message = str(err.value)
    assert "no data folder set" in message and "packaged sample: no split 'dev'" in message
    assert "stanfordnlp/imdb has no split 'dev'" in message
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        load_texts("tweeteval_sentiment:train")  # on the hub, not in the sample
    with pytest.raises(DataError, match="unknown short name"):
        load_texts("sst2:test")


def _hub_shaped_copy(tmp_path, name: str):
    """A saved local dataset with the hub's schema for ``name`` (text + ClassLabel label, no id)."""
    from datasets import ClassLabel, Dataset, Features, Value

    if name == "imdb":
        labels = ClassLabel(names=["neg", "pos"])
        rows = {"text": ["bad<br />film", "dull", "great", "superb"], "label": [0, 0, 1, 1]}
    else:
        labels = ClassLabel(names=["negative", "neutral", "positive"])
        rows = {"text": ["ugh", "ok", "yay"], "label": [0, 1, 2]}
    features = Features({"text": Value("string"), "label": labels})
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / name))
    return tmp_path / name


def test_hub_rows_map_to_compeff_fields(tmp_path):
    from datasets import load_from_disk

    imdb = load_from_disk(str(_hub_shaped_copy(tmp_path, "imdb")))
    assert list(hub_rows("imdb", "test", imdb)) == [
        {"id": "test-neg-0", "text": "bad<br />film", "label": 0},
        {"id": "test-neg-1", "text": "dull", "label": 0},
        {"id": "test-pos-0", "text": "great", "label": 1},
        {"id": "test-pos-1", "text": "superb", "label": 1},
    ]
    tweets = load_from_disk(str(_hub_shaped_copy(tmp_path, "tweeteval_sentiment")))
    assert [r["id"] for r in hub_rows("tweeteval_sentiment", "train", tweets)] == [
        "train-0",
        "train-1",
        "train-2",
    ]


def test_a_name_outside_the_sample_is_read_from_the_hub(tmp_path, monkeypatch, no_data_dir):
    """The real hub path, with datasets' own loader answering from a saved copy of the hub's schema."""
    import datasets

    saved = _hub_shaped_copy(tmp_path, "tweeteval_sentiment")
    calls = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        return datasets.load_from_disk(str(saved))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    rows, names, report = load_labelled("tweeteval_sentiment:train")
    assert calls == [("cardiffnlp/tweet_eval", "sentiment", "train")]
    assert [(r["id"], r["text"], r["label"]) for r in rows] == [
        ("train-0", "ugh", 0),
        ("train-1", "ok", 1),
        ("train-2", "yay", 2),
    ]

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="tried no data folder set.*packaged sample.*no route to host"):
        load_labelled("tweeteval_sentiment:train")


def test_html_breaks_are_cleaned():
    assert clean_text("Great.<br /><br />Loved it.<BR>Really  good ") == "Great.\n\nLoved it.\nReally good"


def test_bad_rows_are_reported_not_crashed_on(tmp_path):
    path = tmp_path / "texts.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"id": "a", "text": "fine text"}) + "\n")
        fh.write("{broken json\n")
        fh.write(json.dumps({"id": "c", "text": "   "}) + "\n")
        fh.write(json.dumps({"id": "d", "text": 42}) + "\n")
        fh.write(json.dumps(["not", "an", "object"]) + "\n")
        fh.write(json.dumps({"id": "f", "text": "also fine"}) + "\n")
    texts, report = load_texts(str(path))
    assert [t["id"] for t in texts] == ["a", "f"]
    assert len(report.problems) == 4
    assert f"{path}:2: invalid JSON" in report.problems[0]
    assert f"{path}:3: empty text" in report.problems[1]
    assert f"{path}:4:" in report.problems[2] and "int" in report.problems[2]


def test_csv_parquet_json_and_saved_dataset(tmp_path):
    rows = [{"id": str(i), "text": f"text {i}", "label": i % 2} for i in range(6)]
    with (tmp_path / "t.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    (tmp_path / "t.json").write_text(json.dumps(rows))
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("t.csv", "t.parquet", "t.json", "saved"):
        loaded, names, report = load_labelled(str(tmp_path / name))
        assert [r["text"] for r in loaded] == [r["text"] for r in rows], name
        assert [r["label"] for r in loaded] == [r["label"] for r in rows] and names == ["0", "1"]
        assert not report.problems


@pytest.mark.parametrize("label", ['"pos"', "Infinity", "1.7", "true", "null"])
def test_labels_must_be_integer_classes(tmp_path, label):
    path = tmp_path / "l.jsonl"
    path.write_text(f'{{"id": 2, "text": "b", "label": 1}}\n{{"id": 1, "text": "a", "label": {label}}}\n')
    with pytest.raises(DataError, match=r"l.jsonl:2: label 'label' = .* is not an integer class"):
        load_labelled(str(path))


def test_integral_numbers_digit_strings_and_names_are_labels(tmp_path):
    path = tmp_path / "l.jsonl"
    rows = [{"id": "a", "text": "x", "label": 1.0}, {"id": "b", "text": "y", "label": "0"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["label"] for r in load_labelled(str(path))[0]] == [1, 0]
    named = tmp_path / "n.jsonl"
    named.write_text('{"id": "a", "text": "x", "label": "positive"}\n')
    assert load_labelled(str(named), label_names=["negative", "positive"])[0][0]["label"] == 1


def test_a_huge_label_is_refused_not_turned_into_millions_of_classes(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"id": 1, "text": "a", "label": 30000000}\n')
    with pytest.raises(DataError, match="outside 0..999"):
        load_labelled(str(path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "id 'a' appears twice"),
        ('{"id": "a", "text": "bad \\ud83d"}\n', "lone surrogate"),
    ],
)
def test_duplicate_ids_and_lone_surrogates_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_texts(str(path))


def test_latin1_bytes_and_a_csv_byte_order_mark(tmp_path):
    latin = tmp_path / "t.csv"
    latin.write_bytes("id,text\n1,caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_texts(str(latin))
    bom = tmp_path / "b.csv"
    bom.write_bytes("id,text,label\n1,fine,1\n".encode("utf-8-sig"))
    rows, _, report = load_labelled(str(bom))
    assert [(r["id"], r["text"], r["label"]) for r in rows] == [("1", "fine", 1)] and not report.problems


def test_two_sources_with_the_same_ids_are_refused(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "texts.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    with pytest.raises(DataError, match="both give the text id 'texts:1'"):
        select_user_texts([str(tmp_path / "a" / "texts.jsonl"), str(tmp_path / "b" / "texts.jsonl")], 2)
