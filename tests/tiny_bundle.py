"""A small but real bundle for tests, built without torch: a WordPiece tokenizer trained with ``tokenizers``
on the fixture abstracts and an ONNX graph (embedding -> masked mean pool -> linear) made with ``onnx.helper``.

Seeds and thresholds give distinct versions; ``broken=`` gives bundles that must be refused.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from webapp.serving.bundle import Manifest, write_bundle

FIXTURES = Path(__file__).parent / "fixtures"
# The tests' tokenizer: build_tokenizer() once, kept (its training is not deterministic; tests/fixtures/README.md).
TOKENIZER = FIXTURES / "tokenizer.json"
LABELS = [
    "Object Detection",
    "Semantic Segmentation",
    "Machine Translation",
    "Question Answering",
    "Anomaly Detection",
    "Speech Recognition",
    "Code Generation",
    "Image Classification",
]


def fixture_abstracts() -> list[dict]:
    with open(FIXTURES / "abstracts.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def build_tokenizer(path: Path, vocab_size: int = 600) -> Path:
    """Train a BERT-style WordPiece tokenizer ([CLS] text [SEP]) on the fixture abstracts (the trainer breaks ties
    differently from run to run: the tests use the one kept in ``TOKENIZER``)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    texts = [f"{row['title']}. {row['abstract']}" for row in fixture_abstracts()]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(path))
    return path


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="papertag-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_encoder(path: Path, vocab_size: int, *, seed: int, hidden: int = 32, nan_after: int | None = None) -> Path:
    """pooled = mean of E[input_ids] over the attention mask; with ``nan_after``, NaN once the sequence (special
    tokens and padding included) is longer than that many tokens: sqrt(nan_after + 0.5 - length) * 0 is added."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "eps"], ["count_safe"]),
        helper.make_node("Div", ["summed", "count_safe"], ["pooled" if nan_after is None else "mean"]),
    ]
    if nan_after is not None:
        nodes += [
            helper.make_node("Shape", ["input_ids"], ["shape"]),
            helper.make_node("Gather", ["shape", "axis1_scalar"], ["length"], axis=0),
            helper.make_node("Cast", ["length"], ["length_f"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["limit", "length_f"], ["room"]),
            helper.make_node("Sqrt", ["room"], ["root"]),
            helper.make_node("Mul", ["root", "zero"], ["poison"]),
            helper.make_node("Add", ["mean", "poison"], ["pooled"]),
        ]
    initializers = [
        numpy_helper.from_array(rng.normal(0, 1.0, (vocab_size, hidden)).astype(np.float32), "E"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([1e-6], dtype=np.float32), "eps"),
    ]
    if nan_after is not None:
        initializers += [
            numpy_helper.from_array(np.array(1, dtype=np.int64), "axis1_scalar"),
            numpy_helper.from_array(np.array(nan_after + 0.5, dtype=np.float32), "limit"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", hidden])]
    return _save(helper.make_graph(nodes, "tiny-encoder", inputs, outputs, initializers), path)


def build_head(path: Path, n_labels: int, *, seed: int, hidden: int = 32, bias: float = 0.0) -> Path:
    """logits = pooled @ W + b; domain = max cosine similarity to a few random reference vectors."""
    rng = np.random.default_rng(seed + 1000)
    weight = rng.normal(0, 3.0, (hidden, n_labels)).astype(np.float32)
    bias_values = np.full((n_labels,), bias, dtype=np.float32) + rng.normal(0, 0.5, n_labels).astype(np.float32)
    references = rng.normal(0, 1.0, (hidden, 8)).astype(np.float32)
    references /= np.linalg.norm(references, axis=0, keepdims=True)
    nodes = [
        helper.make_node("MatMul", ["pooled", "W"], ["projected"]),
        helper.make_node("Add", ["projected", "b"], ["logits"]),
        helper.make_node("LpNormalization", ["pooled"], ["normalised"], axis=1, p=2),
        helper.make_node("MatMul", ["normalised", "R"], ["similarities"]),
        helper.make_node("ReduceMax", ["similarities", "axis1"], ["domain"], keepdims=0),
    ]
    initializers = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(bias_values, "b"),
        numpy_helper.from_array(references, "R"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    inputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", hidden])]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_labels]),
        helper.make_tensor_value_info("domain", TensorProto.FLOAT, ["batch"]),
    ]
    return _save(helper.make_graph(nodes, "tiny-head", inputs, outputs, initializers), path)


def build_bundle(
    target: Path,
    tokenizer_path: Path,
    *,
    seed: int = 0,
    slug: str = "test-tasks",
    name: str = "Test tasks",
    labels: list[str] | None = None,
    threshold: float = 0.5,
    broken: str | None = None,
    metrics: dict | None = None,
    best_guess: bool = False,
    guess_floor: float = 0.0,
    domain_threshold: float | None = None,
    max_windows: int = 1,
    encoder_seed: int = 0,
    max_length: int = 128,
    encoder_nan_after: int | None = None,
    hidden: int = 32,
) -> Path:
    """Write a bundle directory. ``broken``: "label-count" (the head has one output fewer than the labels),
    "corrupt-onnx" (head.onnx is garbage) or "nan" (the head's scores are NaN, so the smoke test fails).
    ``metrics`` replaces the placeholder figures (e.g. a trainer-shaped ``{"test": {...per_label...}}``).
    Bundles with the same ``encoder_seed`` carry the same encoder bytes, so they share one encoder pass.
    ``encoder_nan_after``: the encoder answers NaN for sequences longer than that many tokens; ``hidden``: the
    pooled vector's size."""
    labels = list(labels or LABELS)
    vocab_size = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    with tempfile.TemporaryDirectory() as tmp:
        encoder_path = build_encoder(
            Path(tmp) / "encoder.onnx", vocab_size, seed=encoder_seed, hidden=hidden, nan_after=encoder_nan_after
        )
        head_path = Path(tmp) / "head.onnx"
        outputs = len(labels) - 1 if broken == "label-count" else len(labels)
        bias = float("nan") if broken == "nan" else 0.0
        build_head(head_path, outputs, seed=seed, hidden=hidden, bias=bias)
        if broken == "corrupt-onnx":
            head_path.write_bytes(b"this is not an onnx model" * 10)
        manifest = Manifest(
            taxonomy_slug=slug,
            taxonomy_name=name,
            labels=labels,
            thresholds=[threshold] * len(labels),
            max_length=max_length,
            max_windows=max_windows,
            window_overlap=8 if max_windows > 1 else 0,
            best_guess=best_guess,
            guess_floor=guess_floor,
            domain_threshold=domain_threshold,
            base_model="tests/tiny_bundle.py",
            created_at="2025-01-01T00:00:00Z",
            training_data={"abstracts": 0, "note": f"random weights, seed {seed}"},
            metrics=metrics or {"test": {"micro_f1": 0.1 + seed / 100, "macro_f1": 0.05}},
        )
        return write_bundle(target, manifest, encoder_path, head_path, tokenizer_path)
