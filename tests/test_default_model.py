"""The shipped default bundles: real format-2 int8 models sharing one encoder, that load, predict sensibly, flag
off-domain abstracts and carry honest metrics (the newest papers beside the TF-IDF baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from webapp.serving.bundle import read_manifest
from webapp.serving.inference import load_and_validate, score_all

MODELS = Path(__file__).resolve().parent.parent / "models"
RESEARCH_TASKS = MODELS / "research-tasks"
ARXIV_CATEGORIES = MODELS / "arxiv-categories"
OFF_DOMAIN = Path(__file__).resolve().parent / "fixtures" / "off_domain.jsonl"
DETECTOR = (
    "Object detection. We present a single-stage object detector that predicts bounding boxes and class "
    "probabilities directly from full images, and report state-of-the-art mAP on the COCO benchmark."
)
SPEECH = (
    "Speech enhancement with diffusion models. We denoise noisy speech recordings in the waveform domain and "
    "improve perceptual quality (PESQ) and intelligibility on the VoiceBank-DEMAND benchmark."
)


@pytest.mark.parametrize(
    ("bundle", "min_labels", "abstract", "expected_top"),
    [
        (RESEARCH_TASKS, 150, DETECTOR, "Object Detection"),
        (ARXIV_CATEGORIES, 30, DETECTOR, "cs.CV"),
        (ARXIV_CATEGORIES, 30, SPEECH, "eess.AS"),
    ],
)
def test_shipped_bundle_serves_sensible_labels(bundle: Path, min_labels: int, abstract: str, expected_top: str) -> None:
    model = load_and_validate(bundle)
    assert len(model.labels) >= min_labels
    assert (bundle / "encoder.onnx").stat().st_size < 30_000_000 and (bundle / "head.onnx").stat().st_size < 8_000_000
    [scored] = model.score([abstract])
    top = model.labels[int(scored.probabilities.argmax())]
    assert top == expected_top, top


def test_the_shipped_taxonomies_share_one_encoder_and_one_pass() -> None:
    tasks, categories = load_and_validate(RESEARCH_TASKS), load_and_validate(ARXIV_CATEGORIES)
    assert tasks.manifest.encoder_sha256 == categories.manifest.encoder_sha256
    assert tasks.encoder is categories.encoder
    both = score_all({"tasks": tasks, "categories": categories}, [DETECTOR])
    np.testing.assert_array_equal(both["tasks"][0].embedding, both["categories"][0].embedding)


def test_an_abstracts_answer_does_not_depend_on_what_it_is_scored_with(abstracts: list[dict]) -> None:
    """The int8 encoder and the head's int8 lexical product scale their inputs per onnxruntime run: read in one
    run with other abstracts, a text's reading and scores (and its labels: 15 of 512 research-task abstracts)
    changed with them. Alone, in a CSV batch, in a replay or in the trainer, it gets the same answer."""
    model = load_and_validate(RESEARCH_TASKS)
    texts = [f"{p['title']}. {p['abstract']}" for p in abstracts[:8]]
    together = model.encoder.run(texts)
    logits, domain = model.head_outputs(texts, together)
    for i, (text, reading) in enumerate(zip(texts, together, strict=True)):
        np.testing.assert_array_equal(model.encoder.run([text])[0].pooled, reading.pooled)
        alone_logits, alone_domain = model.head_outputs([text], [reading])
        np.testing.assert_array_equal(alone_logits[0], logits[i])
        assert alone_domain[0] == domain[i]


# Issue 10's targets on the newest papers, as the trainer measured them (bundle.json). arXiv categories are near
# lexical: there the bar is micro-F1 above TF-IDF's and a clearly better macro-F1.
@pytest.mark.parametrize(
    ("bundle", "micro_margin", "hit_margin"), [(RESEARCH_TASKS, 0.05, 0.02), (ARXIV_CATEGORIES, 0.0, -0.01)]
)
def test_shipped_bundle_reports_newest_papers_beside_the_baseline(
    bundle: Path, micro_margin: float, hit_margin: float
) -> None:
    metrics = read_manifest(bundle).metrics
    for split in ("test", "newest"):
        mine, theirs = metrics[split], metrics["baseline"][split]
        assert mine["examples"] == theirs["examples"] > 500
        assert mine["micro_f1"] >= theirs["micro_f1"] + micro_margin
        assert mine["macro_f1"] > theirs["macro_f1"]
        assert mine["empty_share"] < theirs["empty_share"] and mine["empty_share"] <= 0.08
        assert mine["hit_at_3"] >= theirs["hit_at_3"] + hit_margin
    assert metrics["drift"]["micro_f1_delta"] <= 0.01
    assert metrics["training"]["design"]["encoder_weight"] < 1.0  # the lexical part is in use


def test_the_shipped_taxonomies_are_distinct() -> None:
    slugs = {read_manifest(path).taxonomy_slug for path in (RESEARCH_TASKS, ARXIV_CATEGORIES)}
    assert slugs == {"research-tasks", "arxiv-categories"}


@pytest.mark.parametrize(("bundle", "at_least"), [(RESEARCH_TASKS, 9), (ARXIV_CATEGORIES, 3)])
def test_off_domain_abstracts_are_flagged_not_guessed(bundle: Path, at_least: int) -> None:
    """Biology, economics, history, law...: flagged off-domain (research tasks: 11 of 12 when shipped; arXiv
    categories 3 of 12, its papers include cross-lists from biology and economics), never given a best guess then."""
    papers = [json.loads(line) for line in OFF_DOMAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [f"{p['title']}. {p['abstract']}" for p in papers]
    model = load_and_validate(bundle)
    decisions = [model.decide(s.probabilities, s.domain) for s in model.score(texts)]
    assert sum(d.off_domain for d in decisions) >= at_least
    assert not any(d.best_guess for d in decisions if d.off_domain)
    in_domain = model.score([DETECTOR, SPEECH])
    assert all(s.domain >= model.manifest.domain_threshold for s in in_domain)
