"""Data loaders: short names, formats, HTML cleaning, bad rows reported with file and line."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from compeff.data import DataError, clean_text, load_labelled, load_texts


def test_short_names_resolve_to_shared_data():
    texts, report = load_texts("imdb:unsupervised", limit=20)
    assert len(texts) == 20 and not report.problems
    assert all("<br" not in t["text"] for t in texts)
    assert texts[0]["source"] == "imdb:unsupervised" and texts[0]["id"]
    rows, names, _ = load_labelled("tweeteval_sentiment:validation", limit=50)
    assert names == ["negative", "neutral", "positive"] and {r["label"] for r in rows} <= {0, 1, 2}


def test_unknown_split_lists_the_available_ones():
    with pytest.raises(DataError, match="splits there: .*test"):
        load_texts("imdb:dev")


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


def test_labels_must_be_integers(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"id": 1, "text": "a", "label": "pos"}\n{"id": 2, "text": "b", "label": 1}\n')
    rows, _, report = load_labelled(str(path))
    assert [r["id"] for r in rows] == ["2"]
    assert "l.jsonl:1" in report.problems[0] and "'pos'" in report.problems[0]
