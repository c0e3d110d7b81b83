"""The format-2 model in-process: the encoder reads a text in windows and pools them by their token counts, one
encoder is shared by every bundle carrying the same encoder bytes (one pass for all taxonomies), and a decision
gives a best guess or an off-domain flag as the bundle asks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import BundleFactory
from tests.tiny_bundle import LABELS
from webapp.serving.bundle import ENCODER_FILE, compose_text
from webapp.serving.inference import Encoder, LoadedModel, score_all

SHORT = "We detect objects in aerial images with a small convolutional network."


def text_of(paper: dict) -> str:
    return compose_text(paper["title"], paper["abstract"])


def embedding_matrix(bundle: Path) -> np.ndarray:
    """The tiny encoder's token embeddings: its pooled vector is their mean over the tokens it is fed."""
    graph = onnx.load(str(bundle / ENCODER_FILE)).graph
    (matrix,) = [numpy_helper.to_array(t) for t in graph.initializer if t.name == "E"]
    return matrix.astype(np.float64)


class CountingSession:
    """An onnxruntime session that counts its runs and the rows of each."""

    def __init__(self, session: object) -> None:
        self.session, self.rows = session, []

    def run(self, outputs: list[str], feeds: dict, *options: object) -> list:
        self.rows.append(len(feeds["input_ids"]))
        return self.session.run(outputs, feeds, *options)

    def __getattr__(self, name: str) -> object:
        return getattr(self.session, name)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Encoder]:
    """Every ``Encoder.run`` call, as the encoder it ran on (encoders are shared per process, so the class is
    patched rather than one object)."""
    calls: list[Encoder] = []
    real = Encoder.run

    def run(self: Encoder, texts: list[str]) -> list:
        if texts:
            calls.append(self)
        return real(self, texts)

    monkeypatch.setattr(Encoder, "run", run)
    return calls


def test_a_long_text_is_read_in_overlapping_windows_up_to_max_windows(
    make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    model = LoadedModel(make_bundle(seed=1, max_windows=2))
    encoder, manifest = model.encoder, model.manifest
    cls, sep = encoder.tokenizer.token_to_id("[CLS]"), encoder.tokenizer.token_to_id("[SEP]")
    text = text_of(abstracts[0])
    ids = encoder.tokenizer.encode(text, add_special_tokens=False).ids
    content, overlap = manifest.max_length - 2, manifest.window_overlap
    assert manifest.max_windows == 2 and overlap == 8 and len(ids) > content + (content - overlap)

    windows, read, total = encoder.windows(text)
    step = content - overlap
    assert windows == [[cls, *ids[:content], sep], [cls, *ids[step : step + content], sep]]
    assert (read, total) == (content + step, len(ids)) == (manifest.read_tokens, len(ids))

    (scored,) = model.score([text])
    assert scored.read_tokens == manifest.read_tokens < scored.total_tokens == len(ids)
    (short,) = model.score([SHORT])
    assert short.read_tokens == short.total_tokens == len(encoder.tokenizer.encode(SHORT, add_special_tokens=False))


def test_a_text_shorter_than_its_windows_is_read_whole(make_bundle: BundleFactory, abstracts: list[dict]) -> None:
    model = LoadedModel(make_bundle(seed=1, max_windows=2))
    text = text_of(abstracts[2])  # between one and two windows long
    ids = model.encoder.tokenizer.encode(text, add_special_tokens=False).ids
    content = model.manifest.max_length - 2
    step = content - model.manifest.window_overlap
    assert content < len(ids) < step + content
    cls, sep = model.encoder.tokenizer.token_to_id("[CLS]"), model.encoder.tokenizer.token_to_id("[SEP]")
    windows, read, total = model.encoder.windows(text)
    assert windows == [[cls, *ids[:content], sep], [cls, *ids[step:], sep]]
    assert read == total == len(ids)
    windows, read, total = model.encoder.windows(SHORT)
    assert len(windows) == 1 and read == total


def test_the_pooled_vector_is_the_token_weighted_mean_of_the_windows(
    make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    bundle = make_bundle(seed=1, max_windows=2)
    model = LoadedModel(bundle)
    matrix = embedding_matrix(bundle)
    text = text_of(abstracts[2])  # its second window is shorter than the first, so the weights matter
    windows, _, _ = model.encoder.windows(text)
    assert len(windows) == 2 and len(windows[1]) < len(windows[0])
    (reading,) = model.encoder.run([text])
    # The mean over every token read (window by window, [CLS] and [SEP] included) ...
    expected = matrix[[token for window in windows for token in window]].mean(axis=0)
    np.testing.assert_allclose(reading.pooled, expected, rtol=1e-5, atol=1e-6)
    # ... which is not the plain mean of the two windows' vectors.
    plain = np.mean([matrix[window].mean(axis=0) for window in windows], axis=0)
    assert not np.allclose(reading.pooled, plain, rtol=1e-5, atol=1e-6)
    # A one-window text pools its one window; the stored embedding is the pooled vector normalised.
    (scored,) = model.score([SHORT])
    (window,), _, _ = model.encoder.windows(SHORT)
    pooled = matrix[window].mean(axis=0)
    np.testing.assert_allclose(scored.embedding, pooled / np.linalg.norm(pooled), rtol=1e-5, atol=1e-6)


def test_bundles_with_the_same_encoder_share_one_encoder_and_one_pass(
    make_bundle: BundleFactory, abstracts: list[dict], counted: list[Encoder]
) -> None:
    tasks = LoadedModel(make_bundle(seed=1))
    topics = LoadedModel(make_bundle(seed=2, slug="test-topics", name="Test topics"))
    assert tasks.encoder is topics.encoder
    texts = [f"{text_of(paper)} (shared pass)" for paper in abstracts[:3]]  # not in any encoder's cache yet
    session, cache_size = tasks.encoder.session, tasks.encoder._cache_size
    tasks.encoder.session = CountingSession(session)
    tasks.encoder._cache_size = 0  # one pass by design, not because the second taxonomy hits the cache
    try:
        scored = score_all({"test-tasks": tasks, "test-topics": topics}, texts)
        rows = tasks.encoder.session.rows
    finally:
        tasks.encoder.session, tasks.encoder._cache_size = session, cache_size
    assert counted == [tasks.encoder], "one encoder pass for both taxonomies"
    assert rows == [1, 1, 1], "one onnxruntime run per one-window text"
    # Each taxonomy's own head answered, on the same reading.
    for slug, model in (("test-tasks", tasks), ("test-topics", topics)):
        alone = model.head_outputs(texts, model.encoder.run(texts))[0]
        got = np.stack([s.probabilities for s in scored[slug]])
        np.testing.assert_allclose(got, 1 / (1 + np.exp(-alone.astype(np.float64))), rtol=1e-5, atol=1e-6)
        assert [s.read_tokens for s in scored[slug]] == [s.read_tokens for s in scored["test-tasks"]]
    assert not np.allclose(
        np.stack([s.probabilities for s in scored["test-tasks"]]),
        np.stack([s.probabilities for s in scored["test-topics"]]),
    )


def test_each_text_is_read_in_a_run_of_its_own_with_all_its_windows(
    make_bundle: BundleFactory, abstracts: list[dict], counted: list[Encoder]
) -> None:
    tasks = LoadedModel(make_bundle(seed=1, max_windows=2))
    topics = LoadedModel(make_bundle(seed=2, slug="test-topics", name="Test topics", max_windows=2))
    assert tasks.encoder is topics.encoder
    texts = [f"{text_of(paper)} (batches)" for paper in abstracts[:5]]  # two windows each: 10 rows
    session, cache_size = tasks.encoder.session, tasks.encoder._cache_size
    tasks.encoder.session = CountingSession(session)
    tasks.encoder._cache_size = 0
    try:
        score_all({"a": tasks, "b": topics}, texts)
        rows = tasks.encoder.session.rows
    finally:
        tasks.encoder.session, tasks.encoder._cache_size = session, cache_size
    assert counted == [tasks.encoder]
    assert rows == [2] * 5


def test_bundles_with_different_encoders_do_not_share(
    make_bundle: BundleFactory, abstracts: list[dict], counted: list[Encoder]
) -> None:
    tasks = LoadedModel(make_bundle(seed=1))
    topics = LoadedModel(make_bundle(seed=2, slug="test-topics", name="Test topics", encoder_seed=1))
    assert tasks.encoder is not topics.encoder
    assert tasks.manifest.encoder_sha256 != topics.manifest.encoder_sha256
    texts = [f"{text_of(paper)} (two encoders)" for paper in abstracts[:2]]
    score_all({"test-tasks": tasks, "test-topics": topics}, texts)
    assert counted == [tasks.encoder, topics.encoder]
    # Same encoder bytes but another window shape is another encoder too: it reads the text differently.
    windowed = LoadedModel(make_bundle(seed=1, max_windows=2))
    assert windowed.encoder is not tasks.encoder


def test_repeated_texts_come_from_the_encoder_cache(
    make_bundle: BundleFactory, abstracts: list[dict], counted: list[Encoder]
) -> None:
    model = LoadedModel(make_bundle(seed=1))
    text = f"{text_of(abstracts[4])} (cache)"
    first = model.score([text, text])
    again = model.score([text])
    assert len(counted) == 1, "the repeated text was read once"
    np.testing.assert_array_equal(first[0].probabilities, again[0].probabilities)


def test_decide_gives_a_best_guess_only_when_asked_and_in_domain(make_bundle: BundleFactory) -> None:
    low = np.linspace(0.1, 0.6, len(LABELS)).astype(np.float32)  # the last label is the most probable
    guessing = LoadedModel(make_bundle(seed=1, threshold=0.99, best_guess=True))
    decision = guessing.decide(low, domain=0.5)
    assert (decision.labels, decision.best_guess, decision.off_domain) == ([LABELS[-1]], True, False)
    plain = LoadedModel(make_bundle(seed=1, threshold=0.99))
    decision = plain.decide(low, domain=0.5)
    assert (decision.labels, decision.best_guess, decision.off_domain) == ([], False, False)
    # Labels that pass are never marked as a guess.
    passing = guessing.decide(np.where(np.arange(len(LABELS)) == 2, 0.995, 0.1).astype(np.float32), domain=0.5)
    assert (passing.labels, passing.best_guess) == ([LABELS[2]], False)
    # Below the bundle's off-domain cut: flagged, and no guess.
    cautious = LoadedModel(make_bundle(seed=1, threshold=0.99, best_guess=True, domain_threshold=0.3))
    off = cautious.decide(low, domain=0.2)
    assert (off.labels, off.best_guess, off.off_domain) == ([], False, True)
    on = cautious.decide(low, domain=0.3)
    assert (on.labels, on.best_guess, on.off_domain) == ([LABELS[-1]], True, False)
    # A best guess needs the bundle's guess floor: below it the abstract is likely about none of the labels.
    floored = LoadedModel(make_bundle(seed=1, threshold=0.99, best_guess=True, guess_floor=0.7))
    assert floored.decide(low, domain=0.5).labels == []
    assert floored.decide(np.where(np.arange(len(LABELS)) == 3, 0.75, 0.1).astype(np.float32), 0.5).labels == [
        LABELS[3]
    ]


def test_sessions_use_the_threads_given_and_never_spin(make_bundle: BundleFactory) -> None:
    """Idle onnxruntime threads must sleep: spinning ones take the cores other workers and the database need."""
    model = LoadedModel(make_bundle(seed=5, slug="test-spin", name="Test spin"), threads=2)
    # The head gets one: a run of it is shorter than waking a pool (two taxonomies' batches on two busy workers
    # went from 1.23x to 1.01x the cost of one, bench/http_latency.py).
    for session, threads in ((model.encoder.session, 2), (model.head, 1)):
        options = session.get_session_options()
        assert options.intra_op_num_threads == threads
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
