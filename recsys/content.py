"""Content embeddings: TF-IDF + truncated SVD fitted on a tenant's item texts, no download.

`fit(items)` builds one text per item (title, category, brand, tags), fits a TF-IDF over word
unigrams and bigrams plus character 3-5-grams within words (so "jacket" and "jackets", or
"T-LIGHT" and "t-lights", share features), reduces it with a truncated SVD to `dim` dimensions
and returns a `ContentModel`: plain arrays (vocabulary, idf, SVD components) and every item's
unit vector. `ContentModel.embed(texts)` turns any text into a vector of the same space with the
same analysers (scikit-learn's, rebuilt from the saved parameters), so the server can embed a
query or a new item exactly as the pipeline embedded the catalogue.

Files (`save` / `load`): ``<folder>/content_model.npz`` (idf, components, vocabulary) and
``content_items.parquet`` (item_id, vector): written by the pipeline's `content_embeddings` asset
to ``warehouse/<tenant>/content/``; read by the server (`serving.control.embeddings`).
An item whose text holds nothing the vocabulary knows gets the zero vector (no neighbours).
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.models.threads import single_threaded_blas

#: Analyser parameters (the saved model records them; embed rebuilds the same analysers).
WORD = {
    "analyzer": "word",
    "ngram_range": (1, 2),
    "lowercase": True,
    "token_pattern": r"(?u)\b\w+\b",
}
CHAR = {"analyzer": "char_wb", "ngram_range": (3, 5), "lowercase": True}
MODEL_FILE, ITEMS_FILE = "content_model.npz", "content_items.parquet"
#: power iterations of the randomized SVD (scikit-learn's default for TruncatedSVD; 7 cost
#: 20 % more and moved the 1M demo's top-10 content neighbours by 7 %, the share of items
#: whose first neighbour shares a title word staying 1.000)
SVD_ITERATIONS = 5


def item_texts(items: pl.DataFrame) -> list[str]:
    """One text per item row: title, category, brand and tags (without their `kind:` prefix)."""
    cols = set(items.columns)

    def col(name: str) -> list[Any]:
        return items[name].to_list() if name in cols else [None] * items.height

    out = []
    for title, cat, brand, tags in zip(
        col("title"), col("category"), col("brand"), col("tags"), strict=True
    ):
        parts = [title or "", cat or "", brand or ""]
        parts += [t.split(":", 1)[-1] for t in (tags or [])]
        out.append(" ".join(p for p in parts if p))
    return out


@dataclasses.dataclass
class ContentModel:
    """A fitted TF-IDF + SVD model (see the module docstring)."""

    word_vocab: list[str]
    char_vocab: list[str]
    idf: np.ndarray  # float64[len(word_vocab) + len(char_vocab)]
    components: np.ndarray  # float32[dim, features]
    item_ids: list[str]
    item_vectors: np.ndarray  # float32[n_items, dim], unit rows (zero rows: no known text)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def _tfidf(self, texts: list[str]) -> sp.csr_matrix:
        from sklearn.feature_extraction.text import TfidfVectorizer  # (1.4 s to import: see fit)

        word = TfidfVectorizer(vocabulary=self.word_vocab, use_idf=False, norm=None, **WORD)
        char = TfidfVectorizer(vocabulary=self.char_vocab, use_idf=False, norm=None, **CHAR)
        x = sp.hstack([word.fit_transform(texts), char.fit_transform(texts)]).tocsr()
        x.data = 1.0 + np.log(x.data)  # (sublinear tf, as fitted)
        x = x @ sp.diags(self.idf)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return sp.diags(1.0 / norms) @ x

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors (float32[len(texts), dim]) of texts; zero rows for texts with no known
        word or character n-gram."""
        v = np.asarray(self._tfidf(texts) @ self.components.T, dtype=np.float32)
        return _unit(v)

    # --- files -------------------------------------------------------------------------------
    def save(self, folder: str, fs: Any = None) -> None:
        from recsys.durable import write_atomic, write_parquet_atomic

        buf = io.BytesIO()
        np.savez(
            buf,
            idf=self.idf,
            components=self.components,
            word_vocab=np.asarray(self.word_vocab, dtype=object).astype(str),
            char_vocab=np.asarray(self.char_vocab, dtype=object).astype(str),
        )
        if fs is None:
            os.makedirs(folder, exist_ok=True)
        else:
            fs.makedirs(folder, exist_ok=True)
        write_atomic(posixpath.join(folder, MODEL_FILE), buf.getvalue(), fs, sync=False)
        # the vectors' list column from the flat array, with no Python float per value (25,000
        # items x 64: 0.01 s, against 0.3 s through lists)
        vectors = pl.Series(np.ascontiguousarray(self.item_vectors, np.float32).ravel())
        frame = pl.DataFrame(
            {
                "item_id": pl.Series(self.item_ids, dtype=pl.String),
                "vector": vectors.reshape(self.item_vectors.shape).cast(pl.List(pl.Float32)),
            }
        )
        write_parquet_atomic(frame, posixpath.join(folder, ITEMS_FILE), fs, sync=False)

    @classmethod
    def load(cls, folder: str) -> ContentModel:
        with np.load(os.path.join(folder, MODEL_FILE), allow_pickle=False) as z:
            idf, components = z["idf"], z["components"]
            word, char = z["word_vocab"].tolist(), z["char_vocab"].tolist()
        items = pl.read_parquet(os.path.join(folder, ITEMS_FILE))
        vectors = (
            items["vector"].explode().to_numpy().astype(np.float32, copy=False)
            if items.height
            else np.zeros(0, np.float32)
        ).reshape(items.height, components.shape[0])
        return cls(word, char, idf, components, items["item_id"].to_list(), vectors)


def fit(items: pl.DataFrame, dim: int = 64, seed: int = 0, min_df: int = 1) -> ContentModel:
    """Fit the model on a catalogue (`recsys.contract` items columns; title at least)."""
    # scikit-learn is imported here, not with the module: the Dagster definitions import this
    # module, and every step process and `dagster dev` would pay its 1.4 s.
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = item_texts(items)
    word = TfidfVectorizer(sublinear_tf=True, min_df=min_df, norm=None, use_idf=True, **WORD)
    char = TfidfVectorizer(sublinear_tf=True, min_df=min_df, norm=None, use_idf=True, **CHAR)
    xw, xc = word.fit_transform(texts), char.fit_transform(texts)
    idf = np.concatenate([word.idf_, char.idf_])
    word_vocab = sorted(word.vocabulary_, key=word.vocabulary_.get)
    char_vocab = sorted(char.vocabulary_, key=char.vocabulary_.get)
    x = sp.hstack([xw, xc]).tocsr()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    # float32: the SVD's products and normalising factorisations at half the bytes (the same
    # neighbours: 1M demo catalogue, top-10 lists of 2,000 items identical to float64's)
    x = (sp.diags(1.0 / norms) @ x).astype(np.float32)
    k = max(1, min(dim, x.shape[1] - 1, x.shape[0] - 1))
    svd = TruncatedSVD(
        n_components=k, random_state=seed, algorithm="randomized", n_iter=SVD_ITERATIONS
    )
    # one BLAS thread: the factorisations' rounding then does not depend on the machine's
    # thread count (the same vectors everywhere), and on a busy 2-core machine OpenBLAS's
    # spinning second thread cost more than it gave (1M demo, load ~8: 4.9 -> 3.6 s CPU)
    with single_threaded_blas():
        vectors = _unit(np.asarray(svd.fit_transform(x), dtype=np.float32))
    return ContentModel(
        word_vocab,
        char_vocab,
        idf,
        svd.components_.astype(np.float32),
        items["item_id"].to_list(),
        vectors,
    )


def neighbours(
    model: ContentModel, vector: np.ndarray, k: int, exclude: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(item rows, cosine) of the k items nearest `vector`, best first (exact)."""
    scores = model.item_vectors @ np.asarray(vector, dtype=np.float32)
    if exclude is not None:
        scores[exclude] = -np.inf
    k = min(k, scores.shape[0])
    part = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(k)
    order = part[np.lexsort((part, -scores[part]))]
    keep = np.isfinite(scores[order]) & (scores[order] > 0)
    return order[keep], scores[order][keep]


def _unit(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (v / norms).astype(np.float32)
