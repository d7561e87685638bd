"""The "is deep learning worth it" check of seed 002: TF-IDF with naive Bayes or logistic regression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np


def tfidf_baseline(kind: Literal["nb", "lr"], seed: int = 0) -> Any:
    """A scikit-learn pipeline: word uni+bigram TF-IDF, then multinomial NB or logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.pipeline import make_pipeline

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000)
    head = (
        MultinomialNB(alpha=0.1)
        if kind == "nb"
        else LogisticRegression(C=4.0, max_iter=2000, random_state=seed)
    )
    return make_pipeline(vectorizer, head)


def baseline_logits(
    kind: Literal["nb", "lr"],
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    test_texts: Sequence[str],
) -> np.ndarray:
    """Log-probabilities of each test text under a baseline fitted on the training texts (usable as logits)."""
    model = tfidf_baseline(kind).fit(list(train_texts), list(train_labels))
    return np.log(np.clip(model.predict_proba(list(test_texts)), 1e-12, 1.0)).astype(np.float32)
