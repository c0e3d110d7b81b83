"""ONNX export of the encoder and onnxruntime's dynamic int8 quantisation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from webapp.serving.bundle import ENCODER_INPUTS, ENCODER_OUTPUT

from .model import Tagger, mean_pool

log = logging.getLogger(__name__)
OPSET = 17


class PooledEncoder(nn.Module):
    """The encoder half of a :class:`Tagger`: token ids -> mean-pooled vector (the bundle's ``encoder.onnx``)."""

    def __init__(self, tagger: Tagger) -> None:
        super().__init__()
        self.encoder = tagger.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


def export_encoder(model: Tagger, sample_ids: torch.Tensor, sample_mask: torch.Tensor, path: Path) -> Path:
    """Export with dynamic batch and sequence axes (the server pads per batch of windows)."""
    encoder = PooledEncoder(model.eval().to("cpu").float()).eval()
    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        ENCODER_OUTPUT: {0: "batch"},
    }
    with torch.no_grad():
        torch.onnx.export(
            encoder,
            (sample_ids, sample_mask),
            str(path),
            input_names=list(ENCODER_INPUTS),
            output_names=[ENCODER_OUTPUT],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def quantize_int8(fp32_path: Path, int8_path: Path) -> Path:
    """The encoder's dynamic int8 quantisation, onnxruntime's own tool: int8 weights, and activations quantised at
    run time with one scale per run (so the server reads each text in a run of its own). Its INFO lines and its
    advice to pre-process (which does not apply to dynamic quantisation) are kept out of the output.

    Each weight column gets its own scale (per channel): with one scale per matrix the shipped MiniLM's pooled
    vectors were cosine 0.979 (median) from fp32 on real abstracts, per channel 0.997, at the same speed and 0.4%
    more bytes (README "The default model"). The weights use 7 bits (``reduce_range``): on x86 CPUs without VNNI
    (AVX2) onnxruntime's uint8 x int8 kernel sums pairs of products in 16 bits, which 8-bit weights overflow (a
    column of a test product 6% off, against 1% with 7 bits, the same on every CPU; the base MiniLM's pooled
    vectors on such a CPU: cosine 0.9939 against 0.9936 with 8 bits)."""
    quantization_log = logging.getLogger()
    level = quantization_log.level
    quantization_log.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(fp32_path),
            str(int8_path),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
        )
    finally:
        quantization_log.setLevel(level)
    return int8_path


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
