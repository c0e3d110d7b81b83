"""A loaded bundle: onnxruntime session + tokenizer. No Flask here, so the trainer can reuse it.

Sessions must be created after gunicorn forks (PRODUCT principle 5): nothing in this module creates one
at import time.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .bundle import INPUT_NAMES, MODEL_FILE, OUTPUT_NAMES, TOKENIZER_FILE, BundleError, Manifest, read_manifest

SMOKE_TEXT = "Smoke test. We train a convolutional network for image classification and evaluate it."


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Per-label probabilities from logits (in float64, so large logits do not overflow)."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


@dataclass(frozen=True)
class Scored:
    """One text's output: a probability per label (bundle order) and its pooled embedding."""

    probabilities: np.ndarray
    embedding: np.ndarray


class LoadedModel:
    """A bundle ready to predict. Thread-safe: threads tokenise in parallel and take turns on the session."""

    def __init__(self, bundle_dir: str | os.PathLike[str], *, threads: int = 1, cache_size: int = 256) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        self.labels = self.manifest.labels
        self.thresholds = np.asarray(self.manifest.thresholds, dtype=np.float32)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.bundle_dir / TOKENIZER_FILE))
        except Exception as exc:  # tokenizers raises bare Exceptions for malformed files
            raise BundleError(f"tokenizer.json cannot be loaded: {exc}") from exc
        # Truncation is applied before the post-processor adds [CLS]/[SEP], so the end token survives.
        self.tokenizer.enable_truncation(self.manifest.max_length)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(self.bundle_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types for broken graphs
            raise BundleError(f"model.onnx cannot be loaded: {exc}") from exc
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if not set(INPUT_NAMES) <= inputs:
            raise BundleError(f"model.onnx inputs are {sorted(inputs)}, expected {list(INPUT_NAMES)}")
        if list(OUTPUT_NAMES) != outputs[: len(OUTPUT_NAMES)]:
            raise BundleError(f"model.onnx outputs are {outputs}, expected {list(OUTPUT_NAMES)}")
        self._cache: OrderedDict[str, Scored] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        # One run at a time per session: its intra-op threads are already this process's share of the cores,
        # so concurrent runs would only oversubscribe them and hold several batches' activations in memory.
        self._run_lock = threading.Lock()

    def predicted(self, probabilities: np.ndarray) -> list[str]:
        """The labels at or above their threshold, most probable first: what a prediction stores and replay compares."""
        order = np.argsort(-probabilities, kind="stable")
        return [self.labels[j] for j in order if probabilities[j] >= self.thresholds[j]]

    def smoke_test(self) -> None:
        """Predict once and check the output shape: a bundle that fails this never serves."""
        try:
            logits, embedding = self._run([SMOKE_TEXT])
        except Exception as exc:
            raise BundleError(f"smoke prediction failed: {exc}") from exc
        if logits.shape != (1, len(self.labels)):
            raise BundleError(f"model returns {logits.shape[-1]} scores but the bundle lists {len(self.labels)} labels")
        if not np.all(np.isfinite(logits)):
            raise BundleError("smoke prediction returned non-finite scores")

    def _run(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        with self._run_lock:
            logits, embedding = self.session.run(list(OUTPUT_NAMES), {"input_ids": ids, "attention_mask": mask})
        return logits, embedding

    def logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Raw logits for many texts, uncached (used by evaluation and parity checks)."""
        parts = [self._run(texts[i : i + batch_size])[0] for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.labels)), dtype=np.float32)

    def score(self, texts: list[str], batch_size: int = 16) -> list[Scored]:
        """Probabilities and embeddings for each text; repeated texts come from a small LRU cache."""
        keys = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        results: dict[str, Scored] = {}
        with self._cache_lock:
            for key in keys:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    results[key] = self._cache[key]
        todo = list(dict.fromkeys(k for k in keys if k not in results))
        text_of = dict(zip(keys, texts, strict=True))
        # Sort by length so each padded batch wastes little work.
        todo.sort(key=lambda k: len(text_of[k]))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            logits, embedding = self._run([text_of[k] for k in chunk])
            probabilities = sigmoid(logits)
            for i, key in enumerate(chunk):
                results[key] = Scored(probabilities[i].astype(np.float32), embedding[i])
        with self._cache_lock:
            for key in todo:
                self._cache[key] = results[key]
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return [results[k] for k in keys]


def load_and_validate(bundle_dir: str | os.PathLike[str], *, threads: int = 1) -> LoadedModel:
    """Load a bundle and smoke-predict with it; raises :class:`BundleError` if it cannot serve."""
    model = LoadedModel(bundle_dir, threads=threads)
    model.smoke_test()
    return model
