"""Taxonomy hygiene (issue 12 point 10): the finder groups labels differing only by case, separators or obvious
spelling, the shipped alias file merges every such group of the shipped data, and the shipped research-tasks bundle
holds no two labels of one group."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from trainer.__main__ import main
from trainer.config import ConfigError, TrainConfig
from trainer.data import read_papers
from trainer.hygiene import (
    canonical,
    duplicate_groups,
    propose_aliases,
    read_aliases,
    remaining_duplicates,
    spelling_key,
)
from trainer.train import label_aliases, load_dataset
from webapp.serving.bundle import read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
ALIASES = REPO_ROOT / "data" / "pwc-tasks" / "label-aliases.json"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("question_answering", "Question Answering"),
        ("language_modeling", "Language Modelling"),
        ("part-of-speech_tagging", "Part-Of-Speech Tagging"),
        ("Hand-Gesture Recognition", "Hand Gesture Recognition"),
        ("Lip Reading", "Lipreading"),
        ("Image Normalisation", "image normalization"),
        ("Labelled  Data", "labeled-data"),
    ],
)
def test_spellings_of_one_task_share_a_key(a: str, b: str) -> None:
    assert spelling_key(a) == spelling_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("2D Object Detection", "3D Object Detection"),
        ("Face Verification", "Fact Verification"),
        ("Supervised Anomaly Detection", "Unsupervised Anomaly Detection"),
        ("6D Pose Estimation using RGB", "6D Pose Estimation using RGBD"),
        ("Hand Pose Estimation", "Head Pose Estimation"),
    ],
)
def test_different_tasks_keep_different_keys(a: str, b: str) -> None:
    assert spelling_key(a) != spelling_key(b)


def test_groups_and_the_name_each_merges_into() -> None:
    counts = Counter({"question_answering": 27, "Question Answering": 199, "Lip Reading": 3, "Lipreading": 3, "X": 5})
    assert duplicate_groups(counts) == [["Lip Reading", "Lipreading"], ["Question Answering", "question_answering"]]
    # The most used spelling wins; on a tie the readable one, then the first alphabetically.
    assert canonical(["question_answering", "Question Answering"], counts) == "Question Answering"
    assert canonical(["sentiment_analysis", "Sentiment Analysis"]) == "Sentiment Analysis"
    assert canonical(["Lipreading", "Lip Reading"], counts) == "Lip Reading"
    assert propose_aliases(counts) == {"Lipreading": "Lip Reading", "question_answering": "Question Answering"}
    assert remaining_duplicates(counts, propose_aliases(counts)) == []


def test_alias_files_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "aliases.json"
    for text, message in (
        ("[1]", "one JSON object"),
        ("{", "not valid JSON"),
        ('{"a": "b", "b": "c"}', "themselves aliased: a"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_aliases(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_aliases(tmp_path / "missing.json")


def test_the_alias_file_applies_under_the_inline_aliases(tmp_path: Path) -> None:
    data = tmp_path / "papers.jsonl"
    rows = [
        {"id": f"p{i}", "title": f"t{i}", "abstract": f"abstract {i}", "labels": [label]}
        for i, label in enumerate(["question_answering", "Question Answering", "sentiment_analysis", "Other"] * 5)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"question_answering": "Question Answering", "sentiment_analysis": "Sentiment"}))
    config = TrainConfig.from_dict(
        {
            "taxonomy_slug": "t",
            "taxonomy_name": "T",
            "data": [str(data)],
            "label_aliases_file": str(aliases),
            "label_aliases": {"sentiment_analysis": "Sentiment Analysis"},
            "newest_fraction": 0,
            "test_fraction": 0.2,
            "validation_fraction": 0.2,
        }
    )
    assert label_aliases(config)["sentiment_analysis"] == "Sentiment Analysis"
    splits, summary = load_dataset(config)
    labels = {label for papers in splits.values() for paper in papers for label in paper.labels}
    assert labels == {"Question Answering", "Sentiment Analysis", "Other"}
    assert summary["label_aliases"] == 2


def test_the_shipped_aliases_merge_every_duplicate_of_the_shipped_data() -> None:
    counts = Counter(
        label for paper in read_papers(REPO_ROOT / "data/pwc-tasks/papers.jsonl.gz") for label in paper.labels
    )
    aliases = read_aliases(ALIASES)
    assert {"question_answering", "language_modeling", "sentiment_analysis", "named_entity_recognition"} <= set(aliases)
    assert remaining_duplicates(counts, aliases) == []
    assert aliases == propose_aliases(counts)  # the file is what the finder proposes, nothing hand-edited


def test_the_research_tasks_configs_use_the_alias_file() -> None:
    for name in ("default", "research-tasks-heads"):
        config = TrainConfig.load(REPO_ROOT / "trainer" / "configs" / f"{name}.json")
        assert config.label_aliases_file == "data/pwc-tasks/label-aliases.json"


def test_the_shipped_bundle_holds_no_two_spellings_of_one_label() -> None:
    manifest = read_manifest(REPO_ROOT / "models" / "research-tasks")
    assert duplicate_groups(manifest.labels) == []
    assert "Question Answering" in manifest.labels and "question_answering" not in manifest.labels
    assert manifest.training_data["label_aliases"] == len(read_aliases(ALIASES))


def test_label_duplicates_command_fails_while_duplicates_are_left(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["label-duplicates", "--config", "trainer/configs/smoke.json"]) == 1
    out = capsys.readouterr().out
    assert "Question Answering (199) = question_answering (27)" in out
    assert "25 duplicate group(s) left after the config's 0 aliases" in out
    assert main(["label-duplicates", "--config", "trainer/configs/research-tasks-heads.json"]) == 0
    assert "0 duplicate group(s) left after the config's 25 aliases" in capsys.readouterr().out
