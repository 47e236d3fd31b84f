"""The paper's text metrics and the drift ratio as torchmetrics (docs/method.md §7).

Each is a `torchmetrics.Metric`: usable alone (``update`` then ``compute``) and inside the
Lightning loop, where its states are summed across processes like any other metric. The
rates (efficacy, generalization, ...) are plain `MeanMetric`s over per-item values from
`lightning_alphaedit.scoring`; what needs its own arithmetic lives here.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torchmetrics import Metric

WORD = re.compile(r"\w+|[^\w\s]")
"""Words and single punctuation marks, close to NLTK's `word_tokenize` that the reference uses."""

TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")
"""scikit-learn's default `TfidfVectorizer` token pattern (words of two or more characters)."""


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the word n-gram frequencies of ``text`` (0 when it has none)."""
    words = WORD.findall(text)
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def fluency(text: str) -> float:
    """(H2 + 2 H3) / 3: the reference's weighted mean of the bigram and trigram entropies."""
    return (ngram_entropy(text, 2) + 2 * ngram_entropy(text, 3)) / 3


class NgramEntropy(Metric):
    """Fluency: the mean over generated texts of (H2 + 2 H3) / 3, times 100 (unedited models
    score about 620-630; a collapsed model repeating itself scores far less)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, texts: Sequence[str]) -> None:
        self.total += sum(fluency(t) for t in texts)
        self.count += len(texts)

    def compute(self) -> torch.Tensor:
        return 100 * self.total / self.count


class TfidfVocabulary:
    """A TF-IDF space given by a vocabulary (word -> column) and the IDF of each column, the
    files the CounterFact consistency score is defined with (``tfidf_vocab.json``, ``idf.npy``)."""

    def __init__(self, vocabulary: dict[str, int], idf: torch.Tensor) -> None:
        if len(idf) <= max(vocabulary.values(), default=-1):
            raise ValueError(f"IDF has {len(idf)} entries but the vocabulary uses column {max(vocabulary.values())}")
        self.vocabulary, self.idf = vocabulary, idf.double()

    @classmethod
    def load(cls, vocabulary_file: str | Path, idf_file: str | Path) -> TfidfVocabulary:
        """Read the vocabulary (JSON object) and the IDF (``.npy``, ``.json`` list or ``.pt``)."""
        vocabulary = json.loads(Path(vocabulary_file).read_text(encoding="utf-8"))
        path = Path(idf_file)
        if path.suffix == ".npy":
            import numpy as np

            idf = torch.from_numpy(np.load(path))
        elif path.suffix == ".json":
            idf = torch.tensor(json.loads(path.read_text(encoding="utf-8")))
        else:
            idf = torch.load(path, weights_only=True)
        return cls(vocabulary, idf)

    def vector(self, text: str) -> torch.Tensor:
        """Term counts (lower-cased) times IDF over the vocabulary: (V,), float64."""
        vector = torch.zeros(len(self.idf), dtype=torch.float64)
        for word, count in Counter(TFIDF_TOKEN.findall(text.lower())).items():
            if word in self.vocabulary:
                vector[self.vocabulary[word]] += count
        return vector * self.idf

    def cosine(self, a: str, b: str) -> float:
        """Cosine of the two texts' TF-IDF vectors (0 when either has no vocabulary word)."""
        u, v = self.vector(a), self.vector(b)
        norms = float(u.norm() * v.norm())
        return float(u @ v) / norms if norms else 0.0


class TfidfSimilarity(Metric):
    """Consistency: the mean TF-IDF cosine, times 100, between each request's generated texts
    (joined) and reference texts about its new object (joined), as in the reference."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, space: TfidfVocabulary, **kwargs) -> None:
        super().__init__(**kwargs)
        self.space = space
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, generated: Sequence[str], references: Sequence[str]) -> None:
        for text, reference in zip(generated, references, strict=True):
            self.total += self.space.cosine(text, reference)
            self.count += 1

    def compute(self) -> torch.Tensor:
        return 100 * self.total / self.count


class RelativeChange(Metric):
    """‖edited - reference‖_F / ‖reference‖_F over everything seen: the drift ratio
    (0 for an untouched model). Sums of squares are kept, so shards add up exactly."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("change", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("size", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, edited: torch.Tensor, reference: torch.Tensor) -> None:
        self.change += (edited.double() - reference.double()).pow(2).sum()
        self.size += reference.double().pow(2).sum()

    def compute(self) -> torch.Tensor:
        return (self.change / self.size).sqrt()


def per_owner_mean(values: torch.Tensor, owners: Sequence[int]) -> torch.Tensor:
    """Mean of ``values`` per owner (owners in ascending order): per-request averages."""
    owner = torch.tensor(list(owners), dtype=torch.long, device=values.device)
    unique, inverse = torch.unique(owner, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.zeros(len(unique), dtype=values.dtype, device=values.device).index_add_(0, inverse, torch.ones_like(values))
    return sums / counts
