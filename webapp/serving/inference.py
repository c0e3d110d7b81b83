"""A loaded bundle: the shared encoder (windows over the whole abstract -> one pooled vector) and this taxonomy's
head (pooled vector + text -> fused logits, domain similarity). No Flask here, so the trainer reuses it.

Sessions must be created after gunicorn forks (PRODUCT principle 5): nothing in this module creates one
at import time. Bundles with the same encoder bytes share one :class:`Encoder` per process, so an abstract costs
one encoder pass whatever the number of active taxonomies (principle 8).
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .bundle import (
    ENCODER_FILE,
    ENCODER_INPUTS,
    ENCODER_OUTPUT,
    HEAD_FILE,
    HEAD_OUTPUTS,
    HEAD_TEXT_INPUT,
    TOKENIZER_FILE,
    BundleError,
    Manifest,
    read_manifest,
    sha256_file,
)

SMOKE_TEXT = "Smoke test. We train a convolutional network for image classification and evaluate it."
# Largest pooled vector accepted: its normalised copy is stored with every prediction (4096 float32 = 16 KiB).
MAX_POOLED = 4096


# Every run hands its arena's unused chunks back when it ends. Without this each session's arena keeps the memory
# of its largest run for good (a 64-abstract batch, an explanation's variants: worker RSS 188 -> 308 MiB after a
# mixed load, bench/memory.py); with it the arena still serves a run's own allocations, for about 7% more CPU.
RUN_OPTIONS = ort.RunOptions()
RUN_OPTIONS.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Per-label probabilities from logits (in float64, so large logits do not overflow)."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep rather than spin: a spinning pool holds the cores that the other gunicorn worker,
    # the page threads and the database need. With 2 workers x 2 threads on 2 cores, spinning took one abstract over
    # HTTP from 26.7 to 58.0 ms p50 and two clients' batches from 87 to 63 abstracts/s; without it, 25.5 ms and
    # 104/s (bench/http_latency.py, README "Speed"). With one thread there is no pool, so nothing changes.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for broken graphs
        raise BundleError(f"{path.name} cannot be loaded: {exc}") from exc


@dataclass(frozen=True)
class Reading:
    """What the encoder made of one text: the pooled vector and how much of the text it read."""

    pooled: np.ndarray
    read_tokens: int
    total_tokens: int

    @property
    def truncated(self) -> bool:
        return self.read_tokens < self.total_tokens


class Encoder:
    """``encoder.onnx`` + ``tokenizer.json`` reading each text in windows of ``max_length`` tokens.

    Windows hold ``max_length - 2`` content tokens between the tokenizer's own start and end tokens, consecutive
    windows share ``overlap`` tokens, at most ``max_windows`` are read; a text's pooled vector is the windows'
    pooled vectors averaged with their token counts as weights (close to the mean over every token read; tokens of
    an overlap count twice). Thread-safe. Assumes the tokenizer adds one start token and end tokens after the text
    (BERT and RoBERTa styles).
    """

    def __init__(
        self, encoder_path: Path, tokenizer_path: Path, manifest: Manifest, *, threads: int = 1, cache_size: int = 256
    ) -> None:
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises bare Exceptions for malformed files
            raise BundleError(f"tokenizer.json cannot be loaded: {exc}") from exc
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        specials = self.tokenizer.encode("", add_special_tokens=True).ids
        self.prefix, self.suffix = specials[:1], specials[1:]
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or self.tokenizer.token_to_id("<pad>") or 0
        self.content = manifest.max_length - len(specials)
        self.step = self.content - manifest.window_overlap
        self.max_windows = manifest.max_windows
        self.session = _session(encoder_path, threads)
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if not set(ENCODER_INPUTS) <= inputs or ENCODER_OUTPUT not in outputs:
            raise BundleError(
                f"encoder.onnx has inputs {sorted(inputs)} and outputs {outputs}; expected inputs "
                f"{list(ENCODER_INPUTS)} and output {ENCODER_OUTPUT!r}"
            )
        self._cache: OrderedDict[str, Reading] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        # One run at a time per session: its intra-op threads already span every core this process may use.
        self._run_lock = threading.Lock()

    def windows(self, text: str) -> tuple[list[list[int]], int, int]:
        """The token-id windows the encoder reads of ``text``, the content tokens they cover and the text's total."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        starts = list(range(0, max(1, len(ids) - self.content + self.step), self.step))[: self.max_windows] or [0]
        windows = [self.prefix + ids[s : s + self.content] + self.suffix for s in starts]
        read = min(len(ids), starts[-1] + self.content)
        return windows, read, len(ids)

    def run(self, texts: list[str]) -> list[Reading]:
        """Read every text (uncached), in one encoder run per text (its windows together). The int8 encoder scales
        its activations per run, so a text read in one run with others got a reading that depended on them: 15 of
        512 research-task abstracts showed other labels alone than in a batch of 16. Read alone, a text gets the
        same reading wherever it is submitted (API, CSV batch, replay, trainer), at about the same speed on a CPU
        (1 thread: 30 texts/s either way; 2 threads: 40 against 45 in batches of 64)."""
        results = []
        for text in texts:
            windows, covered, length = self.windows(text)
            width = max(len(window) for window in windows)
            ids = np.full((len(windows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(windows), width), dtype=np.int64)
            for row, window in enumerate(windows):
                ids[row, : len(window)] = window
                mask[row, : len(window)] = 1
            with self._run_lock:
                (pooled,) = self.session.run([ENCODER_OUTPUT], {"input_ids": ids, "attention_mask": mask}, RUN_OPTIONS)
            weights = [len(window) for window in windows]
            results.append(Reading(np.average(pooled, axis=0, weights=weights).astype(np.float32), covered, length))
        return results

    def read(self, texts: list[str]) -> list[Reading]:
        """:meth:`run` with a small LRU cache of repeated texts."""
        keys = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        results: dict[str, Reading] = {}
        with self._cache_lock:
            for key in keys:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    results[key] = self._cache[key]
        text_of = dict(zip(keys, texts, strict=True))
        todo = list(dict.fromkeys(k for k in keys if k not in results))
        results.update(zip(todo, self.run([text_of[k] for k in todo]), strict=True))
        with self._cache_lock:
            for key in todo:
                self._cache[key] = results[key]
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return [results[k] for k in keys]


_encoders: weakref.WeakValueDictionary[tuple, Encoder] = weakref.WeakValueDictionary()
_encoders_lock = threading.Lock()


def shared_encoder(
    bundle_dir: Path, manifest: Manifest, threads: int, digests: Mapping[str, str] | None = None
) -> Encoder:
    """The process's :class:`Encoder` for these encoder bytes, tokenizer and windows: made once, shared by every
    loaded bundle that carries them, dropped when none does. ``digests`` are the files' sha256s when the caller
    has just taken them (verifying the model cache), so the same bytes are not hashed twice per load."""
    digests = digests or {}
    digest = hashlib.sha256()
    for name in (ENCODER_FILE, TOKENIZER_FILE):
        digest.update((digests.get(name) or sha256_file(bundle_dir / name)).encode("ascii"))
    key = (digest.hexdigest(), manifest.max_length, manifest.max_windows, manifest.window_overlap, threads)
    with _encoders_lock:
        encoder = _encoders.get(key)
        if encoder is None:
            encoder = Encoder(bundle_dir / ENCODER_FILE, bundle_dir / TOKENIZER_FILE, manifest, threads=threads)
            _encoders[key] = encoder
        return encoder


@dataclass(frozen=True)
class Scored:
    """One text's answer from one taxonomy: a probability per label (bundle order), the normalised embedding (for
    similar papers), the similarity to the training papers and how much of the text the encoder's windows covered
    (a head's lexical part, :attr:`LoadedModel.reads_text`, reads the whole text whatever this says)."""

    probabilities: np.ndarray
    embedding: np.ndarray
    domain: float
    read_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Decision:
    """The labels shown for one answer. ``best_guess``: none passed its threshold, so the most probable one is
    given, marked as below threshold. ``off_domain``: the abstract is unlike every training paper."""

    labels: list[str]
    best_guess: bool
    off_domain: bool


class LoadedModel:
    """A bundle ready to predict: the (shared) encoder and this taxonomy's head. Thread-safe."""

    def __init__(
        self, bundle_dir: str | os.PathLike[str], *, threads: int = 1, digests: Mapping[str, str] | None = None
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        self.labels = self.manifest.labels
        self.thresholds = np.asarray(self.manifest.thresholds, dtype=np.float32)
        self.encoder = shared_encoder(self.bundle_dir, self.manifest, threads, digests)
        # One thread: a head run is a fraction of a millisecond, less than waking a pool of threads costs.
        self.head = _session(self.bundle_dir / HEAD_FILE, 1)
        inputs = {i.name for i in self.head.get_inputs()}
        outputs = [o.name for o in self.head.get_outputs()]
        if ENCODER_OUTPUT not in inputs or not inputs <= {ENCODER_OUTPUT, HEAD_TEXT_INPUT}:
            raise BundleError(f"head.onnx inputs are {sorted(inputs)}, expected pooled (and text)")
        if list(HEAD_OUTPUTS) != outputs[: len(HEAD_OUTPUTS)]:
            raise BundleError(f"head.onnx outputs are {outputs}, expected {list(HEAD_OUTPUTS)}")
        self.reads_text = HEAD_TEXT_INPUT in inputs
        self._head_lock = threading.Lock()

    def head_outputs(self, texts: list[str], readings: list[Reading]) -> tuple[np.ndarray, np.ndarray]:
        """Fused logits [texts, labels] and domain similarities [texts] from the encoder's readings, one head run
        per text (about 0.6 ms). Heads trained before 2026-11-30 (the shipped arXiv head among them) quantise the
        lexical product's input with one scale per run, as the encoder does: run with others, a research-task
        probability moved by up to 0.12. Newer heads multiply in fp32, and a run of its own keeps even their
        rounding independent of the other texts."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32), np.zeros((0,), dtype=np.float32)
        runs = []
        for text, reading in zip(texts, readings, strict=True):
            feed: dict[str, np.ndarray] = {ENCODER_OUTPUT: reading.pooled.reshape(1, -1).astype(np.float32)}
            if self.reads_text:
                feed[HEAD_TEXT_INPUT] = np.asarray([[text]], dtype=object)
            with self._head_lock:
                runs.append(self.head.run(list(HEAD_OUTPUTS), feed, RUN_OPTIONS))
        return np.concatenate([logits for logits, _ in runs]), np.concatenate(
            [domain.reshape(-1) for _, domain in runs]
        )

    def score_readings(self, texts: list[str], readings: list[Reading]) -> list[Scored]:
        logits, domain = self.head_outputs(texts, readings)
        probabilities = sigmoid(logits).astype(np.float32)
        scored = []
        for i, reading in enumerate(readings):
            norm = float(np.linalg.norm(reading.pooled)) or 1.0
            embedding = (reading.pooled / norm).astype(np.float32)
            scored.append(
                Scored(probabilities[i], embedding, float(domain[i]), reading.read_tokens, reading.total_tokens)
            )
        return scored

    def score(self, texts: list[str]) -> list[Scored]:
        """Probabilities, embeddings and reading figures for each text; repeated texts come from the encoder's
        cache."""
        return self.score_readings(texts, self.encoder.read(texts))

    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw fused logits for many texts, uncached (evaluation, explanations, parity checks)."""
        return self.head_outputs(texts, self.encoder.run(texts))[0]

    def decide(self, probabilities: np.ndarray, domain: float) -> Decision:
        """The labels at or above their threshold, most probable first; else the best guess, if the bundle asks for
        one, the abstract is not off-domain and the best label's probability reaches the bundle's ``guess_floor``
        (below it the abstract is most likely about none of the labels)."""
        order = np.argsort(-probabilities, kind="stable")
        passing = [self.labels[j] for j in order if probabilities[j] >= self.thresholds[j]]
        threshold = self.manifest.domain_threshold
        off_domain = threshold is not None and domain < threshold
        top = int(order[0])
        if passing or not self.manifest.best_guess or off_domain or probabilities[top] < self.manifest.guess_floor:
            return Decision(passing, False, off_domain)
        return Decision([self.labels[top]], True, off_domain)

    def predicted(self, scored: Scored) -> list[str]:
        """The labels a stored prediction gets: what replay compares."""
        return self.decide(scored.probabilities, scored.domain).labels

    def smoke_texts(self) -> list[str]:
        """Texts of several lengths: a sentence, half a window, a full window, and one past the last window (so a
        graph that breaks on long inputs, or only once many windows are batched, fails here)."""
        per_sentence = max(1, len(self.encoder.tokenizer.encode(SMOKE_TEXT, add_special_tokens=False).ids))
        content = self.encoder.content
        targets = [content // 2, content, self.manifest.read_tokens + content]
        return [SMOKE_TEXT] + [" ".join([SMOKE_TEXT] * -(-tokens // per_sentence)) for tokens in targets]

    def smoke_test(self) -> None:
        """Predict each smoke text on its own (so every length reaches the graph unpadded) and check output shapes
        and finiteness: a bundle that fails this never serves."""
        for text in self.smoke_texts():
            try:
                readings = self.encoder.run([text])
                logits, domain = self.head_outputs([text], readings)
            except Exception as exc:
                raise BundleError(f"smoke prediction failed: {exc}") from exc
            tokens = readings[0].total_tokens
            pooled = readings[0].pooled
            if pooled.ndim != 1 or not 0 < pooled.shape[0] <= MAX_POOLED:
                raise BundleError(
                    f"the encoder's pooled vector has shape {pooled.shape}; at most {MAX_POOLED} values are stored"
                )
            if logits.shape != (1, len(self.labels)):
                raise BundleError(
                    f"model returns {logits.shape[-1]} scores but the bundle lists {len(self.labels)} labels"
                )
            if domain.shape != (1,):
                raise BundleError(f"head.onnx returns domain of shape {domain.shape}, expected one value per text")
            if not (np.all(np.isfinite(logits)) and np.all(np.isfinite(domain)) and np.all(np.isfinite(pooled))):
                raise BundleError(f"smoke prediction returned non-finite scores (a text of {tokens} tokens)")


def finite(scored: Scored) -> bool:
    """Whether an answer can be stored: NaN or infinite scores are a broken model, not a prediction."""
    values = (scored.probabilities, scored.embedding, np.asarray(scored.domain))
    return all(bool(np.all(np.isfinite(v))) for v in values)


def score_all(
    models: Mapping[str, LoadedModel], texts: list[str], *, errors: dict[str, str] | None = None
) -> dict[str, list[Scored]]:
    """Every model's answers for ``texts`` with one encoder pass per distinct encoder (usually one for all).

    A model that raises or answers non-finite scores raises here; with ``errors`` given it is left out instead and
    the reason put there under its key, so one broken taxonomy never takes the others down.
    """
    readings: dict[int, list[Reading] | Exception] = {}
    results = {}
    for key, model in models.items():
        encoder_id = id(model.encoder)
        try:
            if encoder_id not in readings:
                try:
                    readings[encoder_id] = model.encoder.read(texts)
                except Exception as exc:  # every model on this encoder fails alike, without running it again
                    readings[encoder_id] = exc
            reading = readings[encoder_id]
            if isinstance(reading, Exception):
                raise reading
            scored = model.score_readings(texts, reading)
            if not all(finite(answer) for answer in scored):
                raise BundleError("the model answered non-finite scores")
        except Exception as exc:
            if errors is None:
                raise
            errors[key] = f"{exc.__class__.__name__}: {exc}"[:500]
            continue
        results[key] = scored
    return results


def load_and_validate(
    bundle_dir: str | os.PathLike[str], *, threads: int = 1, digests: Mapping[str, str] | None = None
) -> LoadedModel:
    """Load a bundle and smoke-predict with it; raises :class:`BundleError` if it cannot serve."""
    model = LoadedModel(bundle_dir, threads=threads, digests=digests)
    model.smoke_test()
    return model
