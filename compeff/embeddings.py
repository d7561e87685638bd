"""Sentence embeddings through sentence-transformers, offline by default (the shipped MiniLM)."""

from __future__ import annotations

import numpy as np

from compeff.config import EmbedderSettings
from compeff.models import resolve_model
from compeff.teachers.hf_local import pick_device


def load_embedder(settings: EmbedderSettings):
    """A SentenceTransformer for the recipe's embedder; ``pooling`` other than default rebuilds the
    module stack (the paper uses CLS pooling for UAE-Large-V1)."""
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 5.x moved the module classes
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # pragma: no cover - older releases
        from sentence_transformers.models import Pooling, Transformer

    path = resolve_model(settings.model)
    device = pick_device(settings.device)
    if settings.pooling == "default":
        return SentenceTransformer(path, device=device)
    word = Transformer(path)
    dim_of = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
    pooling = Pooling(dim_of(), pooling_mode=settings.pooling)
    return SentenceTransformer(modules=[word, pooling], device=device)


def embed_texts(texts: list[str], settings: EmbedderSettings, model=None) -> np.ndarray:
    """Embeddings (float32, L2-normalised when settings.normalize) of a list of texts."""
    model = model or load_embedder(settings)
    vectors = model.encode(
        texts,
        batch_size=settings.batch_size,
        normalize_embeddings=settings.normalize,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)
