"""How a prediction result's numbers are stored (issue 13 point 1): a few hundred bytes a result instead of kilobytes
of JSON, read back exactly as before. No Flask or database here: ``webapp.models`` applies it to rows, migration
0012 wrote the same bytes, and ``bench/storage.py`` measures it.

Byte formats (other tools, a vector index among them, may read them directly):

- **Scores** (``prediction_results.score_values``): every label's score in the order of the version's labels
  (``model_versions.labels``), each as its whole number of millionths (the API has always answered scores rounded
  to 6 decimals, so that integer is all there is) written as an unsigned LEB128 varint: 7 bits a byte, the high
  bit set on every byte but a value's last. A score under 0.000128 takes 1 byte, under 0.016384 2, up to 1 3 bytes;
  the shipped models' scores are mostly tiny, so a research-tasks result takes ~300 bytes (float32: 692, JSON:
  ~6 KB). Reading divides the integer by 10**6, which gives exactly the float ``round(score, 6)`` gave: the
  division is correctly rounded (``tests/test_storage.py`` checks all 1,000,001 values in [0, 1]). float16 (11
  significant bits) cannot hold 6 decimals (0.500123 comes back as 0.5); float32 can, but takes 4 bytes a label.
  A result whose scores are not the version's labels in its order, or not 6-decimal values (a base-data paper's
  out-of-fold scores, ``webapp/curation/label_issues.py``), keeps them as a JSON object in ``scores_by_label``
  instead, so nothing is ever rounded away.
- **Thresholds**: the version's (``model_versions.thresholds``, as the scorer rounds them: float32, then 6
  decimals), stored once per version; a result keeps its own in ``thresholds_by_label`` only when they differ.
- **Embeddings** (``embeddings.vector``): the pooled vector's direction as int8, scaled so that its largest
  component is +-127 (1 byte a dimension, 384 for MiniLM), one row per prediction and encoder: taxonomies whose
  bundles share the encoder read the same vector, so their results point at one row
  (``prediction_results.embedding_id``). Similar papers compare directions only (cosine), so no scale is kept;
  sqlite-vec reads the blob as ``vec_int8(vector)``. Measured on 1,500 real abstracts with the shipped encoder:
  cosine similarities within 2.5e-3 of float32's, the 5 nearest neighbours the same set for 98% of 300 queries
  (the rest swap near ties); float16 would be closer (7e-5) but takes twice the bytes, and with it a stored
  (prediction, taxonomy) costs more than issue 13's 2,000 bytes (``bench/storage.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

EMBEDDING_DTYPE = np.dtype("i1")
# Stored scores and thresholds are rounded to this many decimals (what the API answers).
DECIMALS = 6
_SCALE = 10.0**DECIMALS
# A score of at most 1 is at most 1,000,000 millionths: 3 groups of 7 bits.
_GROUPS = 3


def rounded(values: np.ndarray | Sequence[float]) -> np.ndarray:
    """``values`` to the nearest millionth, as float64: each equals Python's ``round(float(v), 6)`` for a float32
    ``v`` (its product with 10**6 is exact in float64, then rounded half to even like ``round``), and the division
    of an exact integer by 10**6 is correctly rounded."""
    return np.rint(np.asarray(values, dtype=np.float64) * _SCALE) / _SCALE


def pack_scores(values: np.ndarray | Sequence[float]) -> bytes:
    """Scores (6-decimal values in [0, 1]) in label order as LEB128 varints of their millionths."""
    units = np.rint(np.asarray(values, dtype=np.float64) * _SCALE).astype(np.int64)
    if units.size and (units.min() < 0 or units.max() > _SCALE):
        raise ValueError("a packed score must lie in [0, 1]")
    shifts = 7 * np.arange(_GROUPS)
    groups = ((units[:, None] >> shifts) & 0x7F).astype(np.uint8)
    length = 1 + (units[:, None] >= 1 << (shifts[1:])).sum(axis=1)
    groups[np.arange(_GROUPS) < (length - 1)[:, None]] |= 0x80  # more bytes follow
    return groups[np.arange(_GROUPS) < length[:, None]].tobytes()


def unpack_scores(blob: bytes) -> np.ndarray:
    """The scores :func:`pack_scores` stored, each the float64 ``round(score, 6)`` gave."""
    data = np.frombuffer(blob, dtype=np.uint8)
    if not data.size:
        return np.zeros(0)
    ends = np.flatnonzero(data < 0x80)  # a value's last byte
    starts = np.concatenate(([0], ends[:-1] + 1))
    length = ends - starts + 1
    if not ends.size or ends[-1] != data.size - 1 or (length > _GROUPS).any():
        raise ValueError("stored scores are not a sequence of varints of at most 3 bytes")
    padded = np.concatenate((data, np.zeros(_GROUPS - 1, dtype=np.uint8))).astype(np.int64) & 0x7F
    units = sum((padded[starts + g] << (7 * g)) * (length > g) for g in range(_GROUPS))
    return units / _SCALE


def pack_embedding(vector: Sequence[float] | np.ndarray) -> bytes:
    """An embedding's direction as int8 bytes, its largest component scaled to +-127."""
    values = np.asarray(vector, dtype=np.float64)
    peak = float(np.max(np.abs(values), initial=0.0))
    scaled = values * (127.0 / peak) if peak > 0 else values
    return np.rint(scaled).astype(EMBEDDING_DTYPE).tobytes()


def unpack_embedding(blob: bytes) -> np.ndarray:
    """A stored embedding as float32 (its direction: normalise it before comparing)."""
    return np.frombuffer(blob, dtype=EMBEDDING_DTYPE).astype(np.float32)


class Packed(NamedTuple):
    """A result's score and threshold columns: ``score_values`` when the scores fit the version's layout, else
    ``scores_by_label``; ``thresholds_by_label`` only when they differ from the version's."""

    score_values: bytes | None
    scores_by_label: dict[str, float] | None
    thresholds_by_label: dict[str, float] | None


@dataclass(frozen=True)
class Layout:
    """A model version's label order and the thresholds its results store, from which packed rows are read."""

    labels: tuple[str, ...]
    thresholds: Mapping[str, float]

    @classmethod
    def of(cls, labels: Sequence[str], thresholds: Sequence[float]) -> Layout:
        """From ``model_versions.labels`` and ``.thresholds``; thresholds as the scorer stores them (it compares
        float32 probabilities with float32 thresholds and stores both rounded to 6 decimals)."""
        if len(labels) != len(thresholds):
            raise ValueError(f"{len(thresholds)} thresholds for {len(labels)} labels")
        as_stored = rounded(np.asarray(thresholds, dtype=np.float32)).tolist()
        return cls(tuple(labels), dict(zip(labels, as_stored, strict=True)))

    def pack(self, scores: Mapping[str, float], thresholds: Mapping[str, float]) -> Packed:
        """The columns that give back exactly ``scores`` and ``thresholds``, in their order and types (exports
        write the dicts as they come), so a row packs only what it would read back unchanged."""
        own_thresholds = None if _same(thresholds, self.thresholds) else dict(thresholds)
        if tuple(scores) == self.labels and all(type(v) is float for v in scores.values()):
            values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
            if np.array_equal(rounded(values), values) and (~np.signbit(values) & (values <= 1)).all():
                return Packed(pack_scores(values), None, own_thresholds)
        return Packed(None, dict(scores), own_thresholds)

    def scores(self, blob: bytes) -> dict[str, float]:
        """Label -> score of a packed row, in label order."""
        values = unpack_scores(blob)
        if len(values) != len(self.labels):
            raise ValueError(f"{len(values)} stored scores for a version of {len(self.labels)} labels")
        return dict(zip(self.labels, values.tolist(), strict=True))


def _same(given: Mapping[str, float], stored: Mapping[str, float]) -> bool:
    """Equal labels in equal order with equal float values (an int 1 would come back as 1.0)."""
    return list(given.items()) == list(stored.items()) and all(type(v) is float for v in given.values())
