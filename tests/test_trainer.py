"""Trainer: the smoke config trains a real (tiny) model, exports int8 ONNX and evaluates it honestly."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from trainer.__main__ import main
from trainer.config import ConfigError, TrainConfig
from trainer.data import (
    Paper,
    arxiv_order,
    choose_labels,
    in_sample,
    merge_corrections,
    newest_cutoff,
    read_papers,
    split_of,
)
from trainer.heads import LEXICAL_C_CHOICES
from trainer.metrics import product_report
from trainer.thresholds import empty_share_bounds, guessing_thresholds, tune_thresholds
from trainer.train import joint_tasks, load_dataset
from webapp.serving.bundle import read_manifest
from webapp.serving.inference import load_and_validate

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = REPO / "trainer" / "configs" / "smoke.json"
PAPERS = REPO / "data" / "pwc-tasks" / "papers.jsonl.gz"
# Trains real models: the SQLite pass of `make test` runs these, the PostgreSQL pass deselects them.
pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer's cache (fine-tuned encoders, encoded abstracts), shared by this module's runs."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def smoke_bundle(tmp_path_factory: pytest.TempPathFactory, work_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "bundle"
    assert main(["train", "--config", str(SMOKE_CONFIG), "--out", str(out), "--work-dir", str(work_dir)]) == 0
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def train_arguments(config: Path, out: Path, work: Path) -> list[str]:
    """``trainer train`` with its own work dir, as a module command line for a subprocess."""
    return ["trainer", "train", "--config", str(config), "--out", str(out), "--work-dir", str(work)]


def smoke_config_with(tmp_path: Path, **changes: object) -> Path:
    config = json.loads(SMOKE_CONFIG.read_text()) | changes
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_smoke_bundle_is_valid_int8_and_serves(smoke_bundle: Path) -> None:
    manifest = read_manifest(smoke_bundle)
    assert manifest.taxonomy_slug == "research-tasks"
    assert len(manifest.labels) >= 2 and len(manifest.thresholds) == len(manifest.labels)
    assert manifest.format_version == 2 and manifest.max_windows == 2 and manifest.best_guess
    encoder = onnx.load(str(smoke_bundle / "encoder.onnx"))
    assert any(node.op_type in {"MatMulInteger", "DynamicQuantizeMatMul"} for node in encoder.graph.node)
    head = onnx.load(str(smoke_bundle / "head.onnx"))
    # The head's lexical matrix is stored in int8, its product in fp32: nothing in it is quantised per run.
    assert {i.name: i.data_type for i in head.graph.initializer}["lexical_weight_int8"] == onnx.TensorProto.INT8
    assert not any(node.op_type in {"MatMulInteger", "DynamicQuantizeLinear"} for node in head.graph.node)
    assert {"Tokenizer", "TfIdfVectorizer"} <= {node.op_type for node in head.graph.node}  # lexical evidence
    model = load_and_validate(smoke_bundle)
    assert model.reads_text
    long_text = " ".join(["We propose a new method for object detection in images."] * 40)
    short, long = model.score(["We propose a new method for object detection in images.", long_text])
    assert short.probabilities.shape == (len(manifest.labels),)
    assert np.isclose(np.linalg.norm(short.embedding), 1.0, atol=1e-3)
    assert short.read_tokens == short.total_tokens
    # The encoder's windows cover the first max_windows of the text (what read_tokens counts); the lexical part
    # reads all of it.
    assert long.read_tokens == model.encoder.run([long_text])[0].read_tokens == manifest.read_tokens < long.total_tokens


def test_smoke_bundle_metrics_are_complete(smoke_bundle: Path) -> None:
    metrics = read_manifest(smoke_bundle).metrics
    test = metrics["test"]
    assert 0.0 <= test["micro_f1"] <= 1.0 and 0.0 <= test["macro_f1"] <= 1.0
    some_label = next(iter(test["per_label"].values()))
    assert {"precision", "recall", "f1", "support", "threshold"} <= set(some_label)
    assert any("pr_curve" in entry and "roc_auc" in entry for entry in test["per_label"].values())
    drift = metrics["drift"]
    assert drift["scope"] == "encoder and head"
    assert metrics["training"]["torch_vs_onnx_fp32_max_abs_pooled"] < 1e-3
    assert drift["micro_f1_delta"] <= 0.15  # a one-layer encoder on 96 test papers: one flipped label moves it
    for split in ("test", "newest"):
        for figures in (metrics[split], metrics["baseline"][split]):
            assert {"micro_f1", "macro_f1", "empty_share", "hit_at_1", "hit_at_3", "hit_at_5"} <= set(figures)
        # Best guesses (above their floor) leave fewer papers empty than the baseline's thresholded answer.
        assert metrics[split]["empty_share"] <= metrics["baseline"][split]["empty_share"]
    assert metrics["newest"]["examples"] == len(_splits(TrainConfig.load(SMOKE_CONFIG))["newest"]) > 0
    design = metrics["training"]["design"]
    assert set(design["fusion_validation_micro_f1"]) == {str(w / 10) for w in range(11)}
    assert 0.0 <= design["encoder_weight"] <= 1.0
    # The smoke config leaves lexical_c at 0: every strength was tried and the best fusion kept.
    tried = design["lexical_c_validation_micro_f1"]
    assert set(tried) == {str(c) for c in LEXICAL_C_CHOICES}
    assert tried[str(design["lexical_c_chosen"])] == max(tried.values())


def test_evaluate_reproduces_the_bundles_test_metrics(smoke_bundle: Path, tmp_path: Path, capsys) -> None:
    test_split = _splits(TrainConfig.load(SMOKE_CONFIG))["test"]
    data = write_jsonl(tmp_path / "test.jsonl", [p.__dict__ for p in test_split])
    capsys.readouterr()
    assert main(["evaluate", str(smoke_bundle), "--data", str(data)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["examples"] == len(test_split)
    assert printed["micro_f1"] == read_manifest(smoke_bundle).metrics["test"]["micro_f1"]


def _splits(config: TrainConfig) -> dict[str, list[Paper]]:
    return load_dataset(config)[0]


def test_newest_split_holds_the_latest_arxiv_ids_and_nothing_else_does() -> None:
    splits = _splits(TrainConfig.load(SMOKE_CONFIG))
    newest = [arxiv_order(p.id) for p in splits["newest"]]
    others = [arxiv_order(p.id) for name in ("train", "validation", "test") for p in splits[name]]
    assert newest and min(newest) > max(order for order in others if order is not None)
    total = sum(len(items) for items in splits.values())
    assert 0.07 < len(newest) / total < 0.13


def test_arxiv_order_reads_new_and_old_style_ids() -> None:
    assert arxiv_order("2106.15989") == (2021, 6, 15989)
    assert arxiv_order("arXiv:0710.3742v2") == (2007, 10, 3742)
    assert arxiv_order("hep-th/9901001") == (1999, 1, 1)
    assert arxiv_order("cs.LG/0703001") == (2007, 3, 1)
    assert arxiv_order("10838") is None and arxiv_order("2113.00001") is None
    assert newest_cutoff([Paper(i, "", "x", []) for i in ("2101.00001", "2012.99999", "x")], 0.5) == (2021, 1, 1)


BYO_FIELDS = {"id": "pmid", "title": "", "abstract": "text", "labels": "hallmarks"}


def byo_rows(count: int, offset: int = 0) -> list[dict]:
    """A brought set shaped like a biomedical one: `pmid`, `text`, `hallmarks`, no title; papers that are about
    neither kept task carry an explicit empty label list (true negatives)."""
    kept = {"Object Detection", "Semantic Segmentation", "Image Classification"}
    rows = []
    for paper in read_papers(PAPERS)[offset : offset + count]:
        rows.append(
            {
                "pmid": int(paper.id.replace(".", "")[-7:]) + offset,
                "text": paper.abstract,
                "hallmarks": sorted(kept & set(paper.labels)),
            }
        )
    return rows


def test_a_brought_set_with_mapped_fields_negatives_and_its_own_test_file(
    smoke_bundle: Path, tmp_path: Path, work_dir: Path, capsys
) -> None:
    """Field names from the config, label-free rows as "none of these" (so no best guess), a separate test file,
    the reused frozen encoder (the same bytes as the bundle it came from), the figures beside the baseline."""
    train_file = write_jsonl(tmp_path / "train.jsonl", byo_rows(500))
    test_file = write_jsonl(tmp_path / "test.jsonl", byo_rows(150, offset=500))
    config = smoke_config_with(
        tmp_path,
        data=[str(train_file)],
        test_data=[str(test_file)],
        fields={"id": "pmid", "title": "", "abstract": "text", "labels": "hallmarks"},
        encoder=str(smoke_bundle),
        min_label_count=5,
        max_examples=0,
        threshold_min_support=0,
    )
    out = tmp_path / "byo"
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(out), "--work-dir", str(work_dir)]) == 0
    manifest = read_manifest(out)
    assert manifest.encoder_sha256 == read_manifest(smoke_bundle).encoder_sha256
    assert (out / "encoder.onnx").read_bytes() == (smoke_bundle / "encoder.onnx").read_bytes()
    assert manifest.metrics["training"]["encoder"] == "frozen"
    assert manifest.best_guess is False  # label-free papers are right to get no label
    test = manifest.metrics["test"]
    negatives = sum(1 for row in byo_rows(150, offset=500) if not row["hallmarks"])
    assert test["examples"] == 150 and test["negatives"] == negatives > 0
    assert 0.0 <= test["negative_fp_rate"] <= 1.0
    assert manifest.metrics["baseline"]["test"]["negatives"] == negatives
    assert "newest" not in manifest.metrics  # pmids are not arXiv ids: nothing is dated
    assert manifest.training_data["label_free_papers"] > 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(test_file), "--config", str(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    # Same rows, same answers to the digit: each text is read in a run of its own, however evaluate groups them.
    assert printed["examples"] == test["examples"] and printed["negatives"] == test["negatives"]
    for figure in ("micro_f1", "macro_f1", "negative_fp_rate", "empty_share"):
        assert printed[figure] == test[figure], figure


def test_a_joint_fine_tune_trains_one_encoder_on_two_taxonomies(tmp_path: Path, work_dir: Path) -> None:
    """The encoder learns the smoke taxonomy and a second one together; the bundle serves the first one's labels
    and records what the encoder learned from. The second set holds half of the smoke papers under ids of its own,
    so each side holds out papers the other would train on: neither fine-tunes on the other's held-out papers."""
    fields = {**BYO_FIELDS, "title": "title"}
    rows = [{**row, "title": paper.title} for row, paper in zip(byo_rows(300), read_papers(PAPERS), strict=False)]
    joint = write_jsonl(tmp_path / "joint.jsonl", rows)
    joint_config = tmp_path / "joint-config.json"
    joint_config.write_text(
        json.dumps(
            {
                "taxonomy_slug": "hallmarks",
                "taxonomy_name": "Hallmarks",
                "data": [str(joint)],
                "fields": fields,
                "min_label_count": 5,
            }
        )
    )
    config = smoke_config_with(
        tmp_path, joint_configs=[str(joint_config)], joint_loss_weight=0.5, epochs=1, baseline=False
    )
    out = tmp_path / "bundle"
    assert main(["train", "--config", str(config), "--out", str(out), "--work-dir", str(work_dir)]) == 0
    manifest = read_manifest(out)
    training = manifest.metrics["training"]
    assert training["encoder"] == "fine-tuned"
    primary, other = training["taxonomies"]

    mine, _ = load_dataset(TrainConfig.load(config))
    my_held_out = {p.text for split in ("validation", "test", "newest") for p in mine[split]}
    papers = read_papers(joint, fields)
    their_train = [p for p in papers if split_of(p.id, 0.1, 0.1) == "train"]
    their_held_out = {p.text for p in papers if split_of(p.id, 0.1, 0.1) != "train"}
    my_train = [p for p in mine["train"] if p.text not in their_held_out]
    assert 0 < len(my_train) < len(mine["train"])  # the overlap is real, both ways
    assert primary == {
        "slug": "research-tasks",
        "labels": len(manifest.labels),
        "train_papers": len(my_train),
        "loss_weight": 1.0,
        "validation_micro_f1_first_window": training["validation_micro_f1_first_window"],
    }
    assert other == {
        "slug": "hallmarks",
        "labels": len(choose_labels(their_train, 5)[0]),
        "train_papers": sum(p.text not in my_held_out for p in their_train),
        "loss_weight": 0.5,
        "validation_micro_f1_first_window": other["validation_micro_f1_first_window"],
    }
    assert other["train_papers"] < len(their_train)
    model = load_and_validate(out)
    assert model.manifest.labels == manifest.labels  # the served head is the first taxonomy's alone
    # The head stage still uses every training paper of the smoke taxonomy.
    assert manifest.training_data["splits"]["train"] == len(mine["train"])


def test_joint_taxonomies_train_on_their_own_train_split_without_this_runs_held_out_papers(tmp_path: Path) -> None:
    rows = byo_rows(400)
    joint = write_jsonl(tmp_path / "joint.jsonl", rows)
    joint_config = tmp_path / "joint-config.json"
    joint_config.write_text(
        json.dumps(
            {"taxonomy_slug": "hallmarks", "taxonomy_name": "H", "data": [str(joint)], "fields": BYO_FIELDS}
            | {"min_label_count": 5}
        )
    )
    config = TrainConfig.load(smoke_config_with(tmp_path, joint_configs=[str(joint_config)]))
    papers = read_papers(joint, BYO_FIELDS)
    train_ids = {p.id for p in papers if split_of(p.id, 0.1, 0.1) == "train"}
    labels, _ = choose_labels([p for p in papers if p.id in train_ids], 5)
    held_out = next(p for p in papers if p.id in train_ids)

    (task,), theirs = joint_tasks(config, {held_out.text})
    assert theirs == {p.text for p in papers if p.id not in train_ids}
    assert task.slug == "hallmarks" and task.width == len(labels)
    assert len(task.texts["train"]) == len(train_ids) - 1 and held_out.text not in task.texts["train"]
    assert task.targets["train"].shape == (len(train_ids) - 1, len(labels))
    assert len(task.texts["validation"]) == sum(split_of(p.id, 0.1, 0.1) == "validation" for p in papers)

    halved = TrainConfig.load(
        smoke_config_with(tmp_path, joint_configs=[str(joint_config)], joint_sample_fraction=0.5, joint_loss_weight=0.5)
    )
    (sampled,), _ = joint_tasks(halved, set())
    assert task.weight == 1.0 and sampled.weight == 0.5
    expected = {p.text for p in papers if p.id in train_ids and in_sample(p.id, 0.5)}
    assert set(sampled.texts["train"]) == expected and 0.35 < len(expected) / len(train_ids) < 0.65
    assert len(sampled.texts["validation"]) == len(task.texts["validation"])  # validation is never sampled

    tiny = TrainConfig.load(smoke_config_with(tmp_path, joint_configs=[str(joint_config)], joint_sample_fraction=1e-6))
    with pytest.raises(ConfigError, match="joint-config.json: no train papers"):
        joint_tasks(tiny, set())

    same_slug = tmp_path / "same.json"
    same_slug.write_text(json.dumps({**json.loads(SMOKE_CONFIG.read_text())}))
    with pytest.raises(ConfigError, match="repeats the taxonomy 'research-tasks'"):
        joint_tasks(TrainConfig.load(smoke_config_with(tmp_path, joint_configs=[str(same_slug)])), set())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"joint_configs": "trainer/configs/arxiv-categories.json"}, "joint_configs must be a list"),
        ({"joint_configs": [""]}, "joint_configs must be a list"),
        (
            {"joint_configs": ["trainer/configs/arxiv-categories.json"], "encoder": "models/research-tasks"},
            "drop either",
        ),
        ({"joint_sample_fraction": 0}, "joint_sample_fraction must lie in (0, 1]"),
        ({"joint_sample_fraction": "half"}, "joint_sample_fraction must lie in (0, 1]"),
        ({"joint_loss_weight": 0.5}, "it needs joint_configs"),
        ({"joint_configs": ["trainer/configs/arxiv-categories.json"], "joint_loss_weight": 0}, "must lie in (0, 100]"),
        ({"joint_configs": ["trainer/configs/arxiv-categories.json"], "joint_loss_weight": "half"}, "(0, 100]"),
        ({"joint_configs": ["no/such/config.json"]}, "no/such/config.json does not exist"),
        ({"lexical_c": -1}, "lexical_c must be positive, or 0"),
        ({"head_c": -0.1}, "head_c and lexical_c must be positive"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(tmp_path: Path, capsys, changes: dict, message: str) -> None:
    config = smoke_config_with(tmp_path, **changes)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err


def test_the_joint_loss_scores_each_paper_on_its_own_taxonomys_labels_only() -> None:
    import torch

    from trainer.finetune import Task, masked_bce, positive_weights, stacked

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=generator)
    targets = (torch.rand(4, 5, generator=generator) > 0.5).float()
    weight = torch.tensor([1.0, 2.0, 3.0, 1.5, 1.0])
    everything = torch.ones(4, 5)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=weight)(logits, targets)
    assert torch.allclose(masked_bce(logits, targets, everything, weight), expected)

    scored = torch.tensor([[1, 1, 1, 0, 0]] * 2 + [[0, 0, 0, 1, 1]] * 2, dtype=torch.float32)
    loss = masked_bce(logits, targets, scored, weight)
    moved = logits.clone()
    moved[0, 3] += 5.0  # a paper of the first taxonomy, a label of the second: not scored
    assert torch.equal(masked_bce(moved, targets, scored, weight), loss)
    moved[0, 0] += 5.0
    assert not torch.equal(masked_bce(moved, targets, scored, weight), loss)

    first = Task("a", {"train": ["x", "y", "z"]}, {"train": np.array([[1, 0], [1, 0], [0, 0]], dtype=np.float32)})
    second = Task("b", {"train": ["w"]}, {"train": np.array([[1]], dtype=np.float32)})
    data = stacked([first, second], "train", [[[1], [2], [3]], [[4]]])
    assert data.ids == [[1], [2], [3], [4]]
    assert data.scored.tolist() == [[1, 1, 0]] * 3 + [[0, 0, 1]]
    assert data.targets.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1]]
    # Negatives over positives among the papers scored on a label (b's paper is no negative of a's labels), from 1:
    # "a0" 1 / 2 -> 1; "a1" 3 / max(0, 1) = 3 (4 if b's paper counted); "b0" 0 / 1 -> 1.
    assert positive_weights(data, 10.0).tolist() == [1.0, 3.0, 1.0]
    assert positive_weights(data, 2.0).tolist() == [1.0, 2.0, 1.0]

    # A joint task's weight scales its papers' cells: the loss is the weighted mean, the positive weights unchanged.
    lighter = Task("b", second.texts, second.targets, weight=0.25)
    weighted = stacked([first, lighter], "train", [[[1], [2], [3]], [[4]]])
    assert weighted.scored.tolist() == [[1, 1, 0]] * 3 + [[0, 0, 0.25]]
    assert positive_weights(weighted, 10.0).tolist() == [1.0, 3.0, 1.0]
    scored = weighted.scored
    cells = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, :3], weighted.targets, pos_weight=weight[:3], reduction="none"
    )
    expected = (cells[:3, :2].sum() + 0.25 * cells[3, 2]) / (6 + 0.25)
    assert torch.allclose(masked_bce(logits[:, :3], weighted.targets, scored, weight[:3]), expected)


def test_training_output_names_dropped_labels_estimates_time_and_hides_quantizer_chatter(tmp_path: Path) -> None:
    config = smoke_config_with(tmp_path, epochs=1, max_examples=300)
    result = subprocess.run(
        [sys.executable, "-m", *train_arguments(config, tmp_path / "bundle", tmp_path / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "labels dropped, seen in fewer than min_label_count=8 training papers" in output
    assert "estimated time: about" in output
    assert "Quantization parameters" not in output and "pre-processing before quantization" not in output
    assert "micro_f1" in output and "baseline" in output  # the closing table


def test_splits_are_deterministic_and_disjoint() -> None:
    ids = [f"2101.{i:05d}" for i in range(2000)]
    first = [split_of(i, 0.1, 0.1) for i in ids]
    assert first == [split_of(i, 0.1, 0.1) for i in ids]
    share = {name: first.count(name) / len(ids) for name in ("train", "validation", "test")}
    assert 0.07 < share["test"] < 0.13 and 0.07 < share["validation"] < 0.13


def test_sample_fraction_keeps_a_stable_share_independent_of_the_split() -> None:
    ids = [f"2503.{i:05d}" for i in range(4000)]
    kept = [i for i in ids if in_sample(i, 0.3)]
    assert 0.27 < len(kept) / len(ids) < 0.33
    assert kept == [i for i in ids if in_sample(i, 0.3)]
    assert set(kept) <= {i for i in ids if in_sample(i, 0.6)}  # a larger sample contains a smaller one
    assert all(in_sample(i, 1.0) for i in ids)
    test_share = sum(split_of(i, 0.1, 0.1) == "test" for i in kept) / len(kept)
    assert 0.07 < test_share < 0.13  # the sample does not skew the splits


def test_sample_fraction_out_of_range_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["train", "--config", str(smoke_config_with(tmp_path, sample_fraction=0)), "--out", str(tmp_path)]) != 0
    assert "sample_fraction" in capsys.readouterr().err


def test_corrections_override_by_id_or_text_and_add_new_papers() -> None:
    base = [Paper("a", "Title A", "Abstract A.", ["X"]), Paper("b", "Title B", "Abstract  B.", ["Y"])]
    corrections = [
        Paper("prediction-7", "title b", "abstract b.", ["Z"]),
        Paper("a", "", "ignored", ["W"]),
        Paper("prediction-8", "New", "A new paper.", ["X"]),
    ]
    merged, counts = merge_corrections(base, corrections)
    assert [p.labels for p in merged] == [["W"], ["Z"], ["X"]]
    assert merged[0].abstract == "Abstract A."
    assert counts == {"overridden": 2, "added": 1}


def test_csv_data_with_separated_labels(tmp_path: Path) -> None:
    path = tmp_path / "papers.csv"
    path.write_text(
        'ID,Title,Abstract,Labels\n1,T,"Some abstract, with comma.",Image Classification|Object Detection\n'
    )
    papers = read_papers(path)
    assert papers[0].labels == ["Image Classification", "Object Detection"]


def test_rare_labels_fall_back_to_the_global_threshold() -> None:
    rng = np.random.default_rng(0)
    targets = np.zeros((200, 2), dtype=np.float32)
    targets[:60, 0] = 1
    targets[0, 1] = 1
    probabilities = np.clip(targets * 0.7 + rng.uniform(0, 0.3, targets.shape), 0, 1)
    thresholds, fallback = tune_thresholds(probabilities, targets, min_support=4)
    assert thresholds[1] == fallback
    assert 0.3 <= thresholds[0] <= 0.7


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "holds no papers"),
        ([{"id": "1", "title": "t", "abstract": "  ", "labels": ["A"]}], "no abstract text"),
        ([{"id": "1", "title": "t", "abstract": "text"}], "no 'labels' field"),
        ([{"id": "1", "title": "t", "abstract": "text", "labels": 3}], "labels must be a list of strings"),
        ([{"id": ["1"], "title": "t", "abstract": "text", "labels": []}], "id must be a string or a number"),
        ([{"id": str(i), "abstract": "text", "labels": ["A"]} for i in range(50)], "needs 2 or more"),
    ],
)
def test_bad_data_is_refused_with_a_clear_message(tmp_path: Path, capsys, rows: list, message: str) -> None:
    data = write_jsonl(tmp_path / "papers.jsonl", rows)
    out = tmp_path / "bundle"
    code = main(
        ["train", "--config", str(smoke_config_with(tmp_path, data=[str(data)], min_label_count=1)), "--out", str(out)]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_data_file_unknown_keys_and_missing_base(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle"
    assert main(["train", "--config", str(smoke_config_with(tmp_path, data=["nope.jsonl.gz"])), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--config", str(smoke_config_with(tmp_path, learning_rat=1)), "--out", str(out)]) == 2
    assert "unknown config keys: learning_rat" in capsys.readouterr().err
    assert main(["train", "--config", str(SMOKE_CONFIG), "--base", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    assert "base model folder" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_gzip_that_is_not_gzip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "papers.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot be read"):
        read_papers(path)
    good = tmp_path / "good.jsonl.gz"
    with gzip.open(good, "wt") as handle:
        handle.write(json.dumps({"id": "1", "abstract": "text", "labels": ["A"]}) + "\n")
    assert read_papers(good)[0].labels == ["A"]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_training_path(tmp_path: Path) -> None:
    config = smoke_config_with(tmp_path, device="cuda", epochs=1, baseline=False)
    out, work = str(tmp_path / "bundle"), str(tmp_path / "work")
    assert main(["train", "--config", str(config), "--out", out, "--work-dir", work]) == 0
    assert "cuda" in read_manifest(tmp_path / "bundle").metrics["training"]["device"]


def test_distributed_training_with_torchrun(tmp_path: Path) -> None:
    """The DistributedDataParallel path (gloo on the CPU here, NCCL on GPUs) trains and exports once."""
    config = smoke_config_with(tmp_path, epochs=1, baseline=False)
    out = tmp_path / "bundle"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    command += train_arguments(config, out, tmp_path / "work")
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_manifest(out).metrics["training"]["processes"] == 2
    load_and_validate(out)


def test_product_report_counts_what_people_see() -> None:
    """Hand-checked: best guesses fill empty answers (not off-domain ones), hit@k ranks the gold label of
    single-label papers, label-free papers given a label are false positives, all-rare papers are neither."""
    probabilities = np.array(
        [
            [0.9, 0.2, 0.1],  # gold A: passes, hit@1
            [0.3, 0.4, 0.1],  # gold A: nothing passes -> best guess B (wrong), A ranked 2nd
            [0.2, 0.1, 0.3],  # gold C: nothing passes -> best guess C (right)
            [0.1, 0.6, 0.2],  # label-free: B passes -> a false positive on a negative
            [0.1, 0.2, 0.3],  # label-free: nothing passes -> best guess C, another false positive
            [0.1, 0.2, 0.45],  # off-domain, gold B: no best guess
        ]
    )
    targets = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=np.float32)
    negatives = np.array([False, False, False, True, True, False])
    domain = np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.1])
    report = product_report(
        probabilities, targets, [0.5] * 3, best_guess=True, domain=domain, domain_threshold=0.5, negatives=negatives
    )
    # Shown: A, B, C, B, C, nothing -> TP 2 (A, C), FP 3 (B, B, C), FN 2 (A of row 2, B of row 6).
    assert report["micro_precision"] == pytest.approx(2 / 5, abs=1e-4) and report["micro_recall"] == pytest.approx(
        2 / 4, abs=1e-4
    )
    assert report["in_scope"] == 4 and report["empty_share"] == pytest.approx(1 / 4, abs=1e-4)
    assert report["negatives"] == 2 and report["negative_fp_rate"] == 1.0
    assert report["single_label"] == 4
    assert report["hit_at_1"] == pytest.approx(2 / 4, abs=1e-4) and report["hit_at_3"] == 1.0
    assert report["off_domain_share"] == pytest.approx(1 / 6, abs=1e-4)
    assert report["thresholded_only"]["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 3), abs=1e-4)
    plain = product_report(probabilities, targets, [0.5] * 3, best_guess=False, negatives=negatives)
    assert plain["empty_share"] == pytest.approx(3 / 4, abs=1e-4) and plain["negative_fp_rate"] == 0.5


def test_guessing_thresholds_choose_for_what_is_shown() -> None:
    """Gold labels always rank first in their paper but overlap other papers' wrong labels: no threshold alone is
    perfect, while above every wrong score the best guesses make the shown answer perfect, and that is chosen."""
    rng = np.random.default_rng(0)
    targets = np.zeros((300, 5), dtype=np.float32)
    targets[np.arange(300), rng.integers(0, 5, 300)] = 1
    gold = rng.uniform(0.3, 0.9, (300, 1))
    probabilities = np.where(targets > 0, gold, gold * rng.uniform(0.2, 0.95, targets.shape))
    plain, _ = tune_thresholds(probabilities, targets, min_support=10_000)
    assert product_report(probabilities, targets, plain, best_guess=False)["micro_f1"] < 0.95
    guessing, global_threshold, floor = guessing_thresholds(probabilities, targets, 10_000, max_empty_share=0.05)
    assert global_threshold > probabilities[targets == 0].max() and floor == 0.0
    assert product_report(probabilities, targets, guessing, best_guess=True)["micro_f1"] == 1.0


def test_the_guess_floor_spares_papers_about_none_of_the_labels_within_the_empty_share() -> None:
    """Papers whose labels are all outside the label set score low everywhere: a guess there is a false positive.
    The floor keeps them empty, and never leaves more in-scope papers empty than allowed."""
    rng = np.random.default_rng(1)
    targets = np.zeros((400, 4), dtype=np.float32)
    targets[:300][np.arange(300), rng.integers(0, 4, 300)] = 1  # the last 100 have no known label
    top = np.where(targets.any(axis=1), rng.uniform(0.2, 0.6, 400), rng.uniform(0.01, 0.1, 400))
    probabilities = np.where(targets > 0, top[:, None], top[:, None] * rng.uniform(0.1, 0.9, targets.shape))
    thresholds, _, floor = guessing_thresholds(probabilities, targets, 10_000, max_empty_share=0.05)
    outside, highest = ~targets.any(axis=1), probabilities.max(axis=1)
    assert highest[outside].max() < floor <= highest[~outside].min()
    report = product_report(probabilities, targets, thresholds, best_guess=True, guess_floor=floor)
    assert report["micro_f1"] == 1.0 and report["empty_share"] == 0.0
    always = product_report(probabilities, targets, thresholds, best_guess=True)
    assert always["micro_f1"] < 0.9
    strict, _, strict_floor = guessing_thresholds(probabilities, targets, 10_000, max_empty_share=0.0)
    assert strict_floor <= 0.2


def test_the_empty_share_is_bounded_with_confidence_not_as_measured() -> None:
    """A floor that leaves 4.5% of 200 validation papers empty measures under 5% but could well leave more on the
    next papers: the upper 95% bound decides, so fewer are left empty than the point share would allow."""
    assert empty_share_bounds(100)[0] == pytest.approx(1 - 0.05 ** (1 / 100))  # none of 100 empty
    assert empty_share_bounds(100)[100] == 1.0 and np.all(np.diff(empty_share_bounds(100)) > 0)
    rng = np.random.default_rng(2)
    targets = np.zeros((200, 4), dtype=np.float32)
    targets[np.arange(200), rng.integers(0, 4, 200)] = 1
    probabilities = np.where(targets > 0, 0.5, 0.05) * rng.uniform(0.9, 1.0, targets.shape)
    # 9 papers (4.5%) have their gold label second: a guess there is wrong, leaving them empty is right by micro-F1.
    weak = np.arange(9)
    probabilities[weak] = np.where(targets[weak] > 0, 0.02, 0.0) + rng.uniform(0.0, 0.01, (9, 4))
    probabilities[weak, (targets[weak].argmax(axis=1) + 1) % 4] = 0.04
    _, _, floor = guessing_thresholds(probabilities, targets, 10_000, max_empty_share=0.05)
    empty = int((probabilities.max(axis=1) < floor).sum())
    assert empty / 200 < 0.045 and empty_share_bounds(200)[empty] <= 0.05
    _, _, loose = guessing_thresholds(probabilities, targets, 10_000, max_empty_share=0.08)
    assert (probabilities.max(axis=1) < loose).sum() == 9, "with room for it, all nine are left empty"


def test_a_validation_split_too_small_to_bound_the_share_still_gets_its_best_pair() -> None:
    """With 20 in-scope papers even one empty answer cannot be bounded under 5%: the pairs that leave none empty
    remain, and the best of them is chosen (not a fallback that tags everything)."""
    assert empty_share_bounds(20)[1] > 0.05
    rng = np.random.default_rng(3)
    targets = np.zeros((20, 4), dtype=np.float32)
    targets[np.arange(20), rng.integers(0, 4, 20)] = 1
    probabilities = np.where(targets > 0, 0.6, rng.uniform(0.05, 0.3, targets.shape))
    thresholds, _, floor = guessing_thresholds(probabilities, targets, 10_000, max_empty_share=0.05)
    report = product_report(probabilities, targets, thresholds, best_guess=True, guess_floor=floor)
    assert report["micro_f1"] == 1.0 and report["empty_share"] == 0.0


def three_column_product(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """An fp32 ONNX graph ``y = x @ w`` whose three weight columns differ in size by 100x each, ``w`` and an ``x``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 3)).astype(np.float32) * np.float32([100.0, 1.0, 0.01])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path, weight, rng.normal(size=(32, 16)).astype(np.float32)


def assert_each_column_within(path: Path, weight: np.ndarray, x: np.ndarray, bound: float) -> None:
    """The graph at ``path``, run as the server runs it, against ``x @ weight`` column by column."""
    from webapp.serving.inference import _session

    got, expected = _session(path, threads=1).run(None, {"x": x})[0], x @ weight
    for column in range(3):
        error = np.abs(got[:, column] - expected[:, column]).mean() / np.abs(expected[:, column]).mean()
        assert error < bound, f"column {column}: mean relative error {error:.3f}"


def test_int8_quantisation_scales_each_weight_column_apart(tmp_path: Path) -> None:
    """A column of small weights beside one of large weights keeps its values: one scale per matrix would round
    the small column to zero (the encoder's pooled vectors then drift from fp32 far more). With 8-bit weights,
    onnxruntime's integer kernel on an AVX2 CPU without VNNI saturated and put the middle column 6% off; 7-bit
    weights (reduce_range) cannot overflow it."""
    from trainer.export import quantize_int8

    fp32, weight, x = three_column_product(tmp_path)
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx")
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(int8)).graph.node), "the MatMul was quantised"
    assert_each_column_within(int8, weight, x, 0.03)


def test_a_matrix_stored_in_int8_keeps_each_column_and_multiplies_in_fp32(tmp_path: Path) -> None:
    """The head's lexical matrix: one scale per column, no quantisation at run time."""
    from onnx import TensorProto

    from trainer.heads import stored_in_int8

    fp32, weight, x = three_column_product(tmp_path)
    stored = stored_in_int8(onnx.load(str(fp32)), "w")
    assert {i.name: i.data_type for i in stored.graph.initializer} == {
        "w_int8": TensorProto.INT8,
        "w_scale": TensorProto.FLOAT,
    }
    assert not any(n.op_type in {"MatMulInteger", "DynamicQuantizeLinear"} for n in stored.graph.node)
    onnx.save(stored, str(tmp_path / "stored.onnx"))
    assert_each_column_within(tmp_path / "stored.onnx", weight, x, 0.02)


def test_the_lexical_strength_is_chosen_with_the_fusion_weight_on_validation() -> None:
    """lexical_c 0 fits the lexical classifier at every strength of LEXICAL_C_CHOICES and keeps the one whose fusion
    scored best on validation; a set lexical_c is the only one fitted."""
    from trainer.heads import choose_head, fit_logistic, validation_f1

    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(60)]
    targets, texts, pooled = {}, {}, {}
    for split, n in (("train", 160), ("validation", 80)):
        labels = (rng.random((n, 2)) < 0.35).astype(np.float32)
        # Label j's word appears in most of its papers (and in a few others), among random filler.
        rows = []
        for row in labels:
            chosen = list(rng.choice(words[4:], 12))
            chosen += [f"w{j}" for j in range(2) if (row[j] and rng.random() < 0.8) or rng.random() < 0.1]
            rows.append(" ".join(chosen))
        targets[split], texts[split] = labels, rows
        pooled[split] = (labels @ rng.normal(size=(2, 8)) + rng.normal(scale=2.0, size=(n, 8))).astype(np.float32)

    design = choose_head(
        pooled, texts, targets, joint_head=None, head_c=0.1, lexical=True, lexical_max_features=500, lexical_c=0
    )
    tried = design.choices["lexical_c_validation_micro_f1"]
    assert set(tried) == {str(c) for c in LEXICAL_C_CHOICES}
    chosen = design.choices["lexical_c_chosen"]
    assert tried[str(chosen)] == max(tried.values())
    # The kept classifier is the fit at the chosen strength, and its fusion scores what was recorded.
    features = {split: design.lexical.features(texts[split]) for split in texts}
    refit = fit_logistic(features["train"], targets["train"], chosen)
    np.testing.assert_allclose(design.lexical_head.weight, refit.weight, rtol=1e-5, atol=1e-6)
    w = design.encoder_weight
    fused = w * design.embedding_head.logits(pooled["validation"]) + (1 - w) * refit.logits(features["validation"])
    assert round(validation_f1(fused, targets["validation"]), 4) == tried[str(chosen)]

    fixed = choose_head(
        pooled, texts, targets, joint_head=None, head_c=0.1, lexical=True, lexical_max_features=500, lexical_c=5.0
    )
    assert list(fixed.choices["lexical_c_validation_micro_f1"]) == ["5.0"]
    assert fixed.choices["lexical_c_chosen"] == 5.0
