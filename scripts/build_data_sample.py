"""Build the data sample that ships inside the package (``compeff/sample_data/``).

Run once by a maintainer, from full local copies of the official splits (the layout of
``COMPEFF_DATA_DIR``: ``imdb/{train,test,unsupervised}.jsonl.gz``,
``tweeteval_sentiment/{validation,test}.jsonl.gz``)::

    python scripts/build_data_sample.py --from /path/to/data

The draw is reproducible: for every split, rows are grouped by label, each group is shuffled with
``random.Random(f"{SEED}:{name}:{split}:{label}")`` and the first rows are kept so that every label
keeps its share of the split (largest remainders); the kept rows are written in their original order,
ids unchanged. Nothing in ``compeff/`` runs this script.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

SEED = 20261201
# name -> split -> rows to keep (None: the whole split)
PLAN: dict[str, dict[str, int | None]] = {
    "imdb": {"train": 1000, "test": 1000, "unsupervised": 1000},
    "tweeteval_sentiment": {"validation": None, "test": 4000},
}


def stratified_indices(labels: list[int], n: int, key: str) -> list[int]:
    """Indices of a label-stratified subset of ``n`` rows (shares by largest remainders), sorted."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    total = len(labels)
    exact = {label: n * len(idx) / total for label, idx in groups.items()}
    quota = {label: int(v) for label, v in exact.items()}
    short = n - sum(quota.values())
    for label in sorted(exact, key=lambda lb: (quota[lb] - exact[lb], lb))[:short]:
        quota[label] += 1
    chosen: list[int] = []
    for label in sorted(groups):
        idx = list(groups[label])
        random.Random(f"{key}:{label}").shuffle(idx)
        chosen.extend(idx[: quota[label]])
    return sorted(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="folder with the full splits")
    parser.add_argument(
        "--to", default=str(Path(__file__).resolve().parent.parent / "compeff" / "sample_data")
    )
    args = parser.parse_args()
    out_root = Path(args.to)
    index: dict[str, dict[str, int]] = {}
    for name, splits in PLAN.items():
        for split, n in splits.items():
            src = Path(args.source) / name / f"{split}.jsonl.gz"
            with gzip.open(src, "rt", encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            keep = (
                range(len(rows))
                if n is None
                else stratified_indices([r["label"] for r in rows], n, f"{SEED}:{name}:{split}")
            )
            out = out_root / name / f"{split}.jsonl.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            # mtime=0: the same rows give the same bytes
            with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                for i in keep:
                    gz.write((json.dumps(rows[i], ensure_ascii=False) + "\n").encode("utf-8"))
            print(f"{out}: {len(keep)} of {len(rows)} rows")
            index[f"{name}:{split}"] = {"rows": len(keep), "official_rows": len(rows)}
    (out_root / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
