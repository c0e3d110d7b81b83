"""Build BERT/RoBERTa-shaped encoders as ONNX graphs with random weights, without torch or a hub.

Two output contracts share one transformer body (embeddings, ``layers`` x (self-attention, GELU FFN, post-LayerNorm),
masked mean pooling over ``attention_mask``); inputs are ``input_ids`` and ``attention_mask`` (int64, [batch, seq]):

- :func:`build_encoder`: a format-2 bundle's shared ``encoder.onnx``, output ``pooled`` ([batch, hidden],
  mean-pooled, not normalised). With :data:`MINILM_L6` it has the default model's shape (all-MiniLM-L6-v2);
- :func:`build_classifier`: the old one-graph contract the ancestors deployed, outputs ``logits`` ([batch, labels],
  a linear head on the pooled vector) and the L2-normalised ``embedding``. With :data:`DISTILROBERTA` it is the
  reference model of ``bench/http_latency.py``.

Both are quantised to int8 with onnxruntime's dynamic quantisation, as the trainer's export does. Random weights
cost exactly what trained ones cost.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int


# What the ancestors deployed (distilroberta-base) and what papertag's default fine-tunes (all-MiniLM-L6-v2).
DISTILROBERTA = Shape(layers=6, hidden=768, heads=12, ffn=3072, vocab=50265, max_positions=514)
MINILM_L6 = Shape(layers=6, hidden=384, heads=12, ffn=1536, vocab=30522, max_positions=512)


class _Graph:
    def __init__(self, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, *shape: int, scale: float = 0.02) -> str:
        return self.const(self.rng.normal(0, scale, shape).astype(np.float32), "w")

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def output(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, [name], **attrs))

    def linear(self, x: str, fan_in: int, fan_out: int) -> str:
        projected = self.op("MatMul", [x, self.weight(fan_in, fan_out)])
        return self.op("Add", [projected, self.const(np.zeros(fan_out, dtype=np.float32), "b")])

    def layer_norm(self, x: str, hidden: int) -> str:
        scale = self.const(np.ones(hidden, dtype=np.float32), "ln_g")
        bias = self.const(np.zeros(hidden, dtype=np.float32), "ln_b")
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)


def _pooled(g: _Graph, shape: Shape) -> str:
    """The transformer body on ``input_ids``/``attention_mask``; returns the masked mean of its last hidden states."""
    h, heads = shape.hidden, shape.heads
    head_dim = h // heads
    ids, mask = "input_ids", "attention_mask"
    # Embeddings: words + positions, then LayerNorm.
    words = g.op("Gather", [g.weight(shape.vocab, h), ids])
    seq_len = g.op("Gather", [g.op("Shape", [ids]), g.const(np.array(1, dtype=np.int64))], axis=0)
    positions = g.op("Range", [g.const(np.array(0, dtype=np.int64)), seq_len, g.const(np.array(1, dtype=np.int64))])
    x = g.op("Add", [words, g.op("Gather", [g.weight(shape.max_positions, h), positions])])
    x = g.layer_norm(x, h)
    # Additive attention mask [batch, 1, 1, seq]: 0 where attended, -10000 on padding.
    mask_f = g.op("Cast", [mask], to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const(np.array(1.0, dtype=np.float32)), mask_f])
    bias = g.op("Mul", [inverted, g.const(np.array(-10000.0, dtype=np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const(np.array([1, 2], dtype=np.int64))])
    split_heads = g.const(np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_heads = g.const(np.array([0, 0, h], dtype=np.int64))
    inv_sqrt = g.const(np.array(1.0 / math.sqrt(head_dim), dtype=np.float32))
    for _ in range(shape.layers):
        q = g.op("Transpose", [g.op("Reshape", [g.linear(x, h, h), split_heads])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [g.linear(x, h, h), split_heads])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [g.linear(x, h, h), split_heads])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), inv_sqrt]), bias])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge_heads])
        x = g.layer_norm(g.op("Add", [x, g.linear(context, h, h)]), h)
        up = g.linear(x, h, shape.ffn)
        # GELU (erf form), which onnxruntime fuses.
        erf = g.op("Erf", [g.op("Div", [up, g.const(np.array(math.sqrt(2), dtype=np.float32))])])
        half = g.op("Mul", [up, g.const(np.array(0.5, dtype=np.float32))])
        gelu = g.op("Mul", [half, g.op("Add", [erf, g.const(np.array(1.0, dtype=np.float32))])])
        x = g.layer_norm(g.op("Add", [x, g.linear(gelu, shape.ffn, h)]), h)
    # Masked mean pooling.
    mask3 = g.op("Unsqueeze", [mask_f, g.const(np.array([2], dtype=np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3]), g.const(np.array([1], dtype=np.int64))], keepdims=0)
    count = g.op("ReduceSum", [mask3, g.const(np.array([1], dtype=np.int64))], keepdims=0)
    return g.op("Div", [summed, g.op("Max", [count, g.const(np.array([1e-6], dtype=np.float32))])])


def _save(g: _Graph, name: str, outputs: list[tuple[str, list[str | int]]], path: Path, quantize: bool) -> Path:
    """Write the graph with the two encoder inputs and ``outputs`` (name, shape) to ``path`` (int8 if ``quantize``)."""
    graph = helper.make_graph(
        g.nodes,
        name,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, dims) for out, dims in outputs],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="papertag-bench")
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    if not quantize:
        onnx.save(model, str(path))
        return path
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(fp32))
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    return path


def build_encoder(path: Path, shape: Shape, *, seed: int = 0, quantize: bool = True) -> Path:
    """A format-2 ``encoder.onnx`` (output ``pooled``, not normalised) at ``path``; returns it."""
    g = _Graph(seed)
    g.output("Identity", [_pooled(g, shape)], "pooled")
    return _save(g, "encoder", [("pooled", ["batch", shape.hidden])], path, quantize)


def build_classifier(path: Path, shape: Shape, n_labels: int, *, seed: int = 0, quantize: bool = True) -> Path:
    """An encoder with a linear head in one graph (outputs ``logits`` and the L2-normalised ``embedding``), the
    contract the ancestors' model had, at ``path``; returns it."""
    g = _Graph(seed)
    pooled = _pooled(g, shape)
    g.output("Identity", [g.linear(pooled, shape.hidden, n_labels)], "logits")
    g.output("LpNormalization", [pooled], "embedding", axis=1, p=2)
    outputs: list[tuple[str, list[str | int]]] = [
        ("logits", ["batch", n_labels]),
        ("embedding", ["batch", shape.hidden]),
    ]
    return _save(g, "classifier", outputs, path, quantize)
