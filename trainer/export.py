"""ONNX export, dynamic int8 quantisation and the parity checks that guard them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from webapp.bundle import INPUT_NAMES, OUTPUT_NAMES

from .model import Tagger

log = logging.getLogger(__name__)
OPSET = 17


def export_fp32(model: Tagger, sample_ids: torch.Tensor, sample_mask: torch.Tensor, path: Path) -> Path:
    """Export with dynamic batch and sequence axes (the server pads per batch)."""
    model = model.eval().to("cpu").float()
    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
        "embedding": {0: "batch"},
    }
    with torch.no_grad():
        torch.onnx.export(
            model,
            (sample_ids, sample_mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def quantize_int8(fp32_path: Path, int8_path: Path) -> Path:
    """Dynamic int8 quantisation of the weights (activations stay float), onnxruntime's own tool."""
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    return int8_path


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
