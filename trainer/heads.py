"""A taxonomy's head on the frozen shared encoder: a logistic-regression head on the pooled embedding, a TF-IDF +
logistic-regression classifier on the text, their fusion (weight chosen on validation) and the off-domain
reference, all written as one ``head.onnx`` that onnxruntime serves (no torch: this runs in minutes on a CPU).

The lexical classifier is fitted on the features the served graph itself computes (skl2onnx's TF-IDF graph run by
onnxruntime), so what was tuned is what serves.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from joblib import Parallel, delayed
from onnx import TensorProto, helper, numpy_helper
from scipy import sparse
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import StringTensorType
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from webapp.quality.tuning import best_global_threshold
from webapp.serving.bundle import ENCODER_OUTPUT, HEAD_OUTPUTS, HEAD_TEXT_INPUT

from .export import OPSET

log = logging.getLogger(__name__)
# sklearn's default token pattern, which onnxruntime's Tokenizer op runs as a regular expression.
TOKEN_PATTERN = r"\b\w\w+\b"
# A locale every Linux has: skl2onnx's default en_US.UTF-8 is missing on slim images and onnxruntime refuses it.
LOCALE = "C.UTF-8"
HEAD_C_CHOICES = (0.03, 0.1, 0.3, 1.0)
# The lexical classifier's strength differs by taxonomy: research tasks (173 labels, 5,811 papers) scored best on
# validation at C=1000, arXiv categories (48 labels, 33,000 papers) at C=3, where macro-F1 fell, so their config
# sets 10 (README, Training).
LEXICAL_C_CHOICES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
FUSION_GRID = np.round(np.linspace(0.0, 1.0, 11), 2)
DOMAIN_REFERENCES = 1024
UNFITTED_BIAS = -12.0
# The head's one large matrix, the lexical weights, is stored in int8; the embedding head and the off-domain
# similarity stay fp32: small, and int8 noise flipped papers across thresholds (the similarity's cut especially).
LEXICAL_WEIGHT = "lexical_weight"


@dataclass
class LinearHead:
    """logits = ((features - mean) / scale) @ weight + bias; the standardisation stays a step of its own in the
    graph (folded into the weights it would cancel large numbers against each other)."""

    weight: np.ndarray  # [features, labels]
    bias: np.ndarray  # [labels]
    mean: np.ndarray | None = None  # [features]
    scale: np.ndarray | None = None  # [features]

    def logits(self, features: np.ndarray | sparse.spmatrix) -> np.ndarray:
        if self.mean is not None and self.scale is not None:
            features = (np.asarray(features) - self.mean) / self.scale
        return np.asarray(features @ self.weight) + self.bias


def _fit_label(features: np.ndarray | sparse.spmatrix, column: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    if not 0 < column.sum() < len(column):
        return np.zeros(features.shape[1], dtype=np.float32), UNFITTED_BIAS
    model = LogisticRegression(C=c, max_iter=1000)
    model.fit(features, column)
    return model.coef_[0].astype(np.float32), float(model.intercept_[0])


def fit_logistic(features: np.ndarray | sparse.spmatrix, targets: np.ndarray, c: float) -> LinearHead:
    """One L2 logistic regression per label, on every core (labels without a positive, or without a negative,
    get zero weights and a strongly negative bias)."""
    fitted = Parallel(n_jobs=-1)(delayed(_fit_label)(features, targets[:, j], c) for j in range(targets.shape[1]))
    weight = np.stack([w for w, _ in fitted], axis=1) if fitted else np.zeros((features.shape[1], 0), np.float32)
    return LinearHead(weight.astype(np.float32), np.asarray([b for _, b in fitted], dtype=np.float32))


def standardised_head(pooled: np.ndarray, targets: np.ndarray, c: float) -> LinearHead:
    """Logistic regression on standardised embeddings."""
    mean, scale = pooled.mean(axis=0).astype(np.float32), (pooled.std(axis=0) + 1e-6).astype(np.float32)
    head = fit_logistic((pooled - mean) / scale, targets, c)
    return LinearHead(head.weight, head.bias, mean, scale)


def validation_f1(logits: np.ndarray, targets: np.ndarray) -> float:
    return best_global_threshold(1 / (1 + np.exp(-logits)), targets)[1]


def tfidf_vectorizer(max_features: int) -> TfidfVectorizer:
    """The lexical half's TF-IDF (1-2 grams, sublinear), unfitted: the served head and the out-of-fold scores of
    the label-issues queue read text the same way."""
    return TfidfVectorizer(
        ngram_range=(1, 2), min_df=2, max_features=max_features, sublinear_tf=True, token_pattern=TOKEN_PATTERN
    )


class Lexical:
    """TF-IDF (1-2 grams) as an ONNX graph, and its features computed by onnxruntime."""

    def __init__(self, train_texts: list[str], max_features: int) -> None:
        self.vectorizer = tfidf_vectorizer(max_features)
        self.vectorizer.fit(train_texts)
        self.graph = convert_sklearn(
            self.vectorizer,
            initial_types=[(HEAD_TEXT_INPUT, StringTensorType([None, 1]))],
            target_opset=OPSET,
            options={id(self.vectorizer): {"tokenexp": TOKEN_PATTERN}},
        )
        for node in self.graph.graph.node:
            if node.op_type == "StringNormalizer":
                kept = [a for a in node.attribute if a.name != "locale"]
                del node.attribute[:]
                node.attribute.extend([*kept, helper.make_attribute("locale", LOCALE)])
        self._session = ort.InferenceSession(self.graph.SerializeToString(), providers=["CPUExecutionProvider"])

    @property
    def size(self) -> int:
        return len(self.vectorizer.vocabulary_)

    def features(self, texts: list[str], batch_size: int = 512) -> sparse.csr_matrix:
        parts = []
        for start in range(0, len(texts), batch_size):
            batch = np.asarray(texts[start : start + batch_size], dtype=object).reshape(-1, 1)
            parts.append(sparse.csr_matrix(self._session.run(None, {HEAD_TEXT_INPUT: batch})[0]))
        return sparse.vstack(parts).tocsr() if parts else sparse.csr_matrix((0, self.size), dtype=np.float32)


def domain_references(pooled: np.ndarray, seed: int) -> np.ndarray:
    """Normalised training embeddings an abstract is compared with ([hidden, references])."""
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(pooled))[:DOMAIN_REFERENCES]
    chosen = pooled[np.sort(picks)]
    return (chosen / (np.linalg.norm(chosen, axis=1, keepdims=True) + 1e-9)).T.astype(np.float32)


def build_head(
    path: Path,
    embedding_head: LinearHead,
    references: np.ndarray,
    lexical: Lexical | None = None,
    lexical_head: LinearHead | None = None,
    encoder_weight: float = 1.0,
) -> Path:
    """Write ``head.onnx``: logits = w * embedding head + (1 - w) * lexical head; domain = max cosine similarity to
    the reference embeddings. The lexical matrix is stored in int8 (:func:`stored_in_int8`); the rest stays fp32.
    The fp32 graph is kept beside it for the drift check."""
    hidden, n_labels = embedding_head.weight.shape
    mean = embedding_head.mean if embedding_head.mean is not None else np.zeros(hidden, np.float32)
    scale = embedding_head.scale if embedding_head.scale is not None else np.ones(hidden, np.float32)
    initializers = [
        numpy_helper.from_array(mean.astype(np.float32), "embedding_mean"),
        numpy_helper.from_array((1.0 / scale).astype(np.float32), "embedding_inverse_scale"),
        numpy_helper.from_array((encoder_weight * embedding_head.weight).astype(np.float32), "embedding_weight"),
        numpy_helper.from_array((encoder_weight * embedding_head.bias).astype(np.float32), "embedding_bias"),
        numpy_helper.from_array(references, "references"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Sub", [ENCODER_OUTPUT, "embedding_mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "embedding_inverse_scale"], ["standardised"]),
        helper.make_node("MatMul", ["standardised", "embedding_weight"], ["embedding_product"]),
        helper.make_node("Add", ["embedding_product", "embedding_bias"], ["embedding_logits"]),
        helper.make_node("LpNormalization", [ENCODER_OUTPUT], ["normalised"], axis=1, p=2),
        helper.make_node("MatMul", ["normalised", "references"], ["similarities"]),
        helper.make_node("ReduceMax", ["similarities", "axis1"], [HEAD_OUTPUTS[1]], keepdims=0),
    ]
    inputs = [helper.make_tensor_value_info(ENCODER_OUTPUT, TensorProto.FLOAT, ["batch", hidden])]
    opsets = [helper.make_opsetid("", 18)]
    if lexical is not None and lexical_head is not None:
        lexical_graph = lexical.graph.graph
        (tfidf_output,) = [o.name for o in lexical_graph.output]
        initializers += list(lexical_graph.initializer) + [
            numpy_helper.from_array(((1 - encoder_weight) * lexical_head.weight).astype(np.float32), LEXICAL_WEIGHT),
            numpy_helper.from_array(((1 - encoder_weight) * lexical_head.bias).astype(np.float32), "lexical_bias"),
        ]
        nodes = (
            list(lexical_graph.node)
            + nodes
            + [
                helper.make_node("MatMul", [tfidf_output, LEXICAL_WEIGHT], ["lexical_product"]),
                helper.make_node("Add", ["lexical_product", "lexical_bias"], ["lexical_logits"]),
                helper.make_node("Add", ["embedding_logits", "lexical_logits"], [HEAD_OUTPUTS[0]]),
            ]
        )
        inputs.append(helper.make_tensor_value_info(HEAD_TEXT_INPUT, TensorProto.STRING, ["batch", 1]))
        opsets += [o for o in lexical.graph.opset_import if o.domain not in ("", "ai.onnx")]
    else:
        nodes.append(helper.make_node("Identity", ["embedding_logits"], [HEAD_OUTPUTS[0]]))
    graph = helper.make_graph(
        nodes,
        "papertag-head",
        inputs,
        [
            helper.make_tensor_value_info(HEAD_OUTPUTS[0], TensorProto.FLOAT, ["batch", n_labels]),
            helper.make_tensor_value_info(HEAD_OUTPUTS[1], TensorProto.FLOAT, ["batch"]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=opsets, producer_name="papertag-trainer")
    model.ir_version = 9
    onnx.checker.check_model(model)
    fp32_path = path.with_suffix(".fp32.onnx")
    onnx.save(model, str(fp32_path))
    if lexical is None:
        shutil.copyfile(fp32_path, path)
    else:
        onnx.save(stored_in_int8(model, LEXICAL_WEIGHT), str(path))
    return path


def stored_in_int8(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``name`` (a [features, labels] matrix) is stored in int8 with a scale
    per column, made fp32 again by a Cast and a Mul on constants that onnxruntime folds once, when it loads the head.
    A quarter of the bytes, while the product itself stays fp32: a quantised product (onnxruntime's dynamic
    quantisation) also scales the abstract's features per run, which made a text's scores depend on the texts run
    with it, and its uint8 x int8 sums saturate on CPUs without VNNI (a probability moved by 0.17 from fp32)."""
    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    (weights,) = [i for i in stored.graph.initializer if i.name == name]
    matrix = numpy_helper.to_array(weights)
    scale = np.maximum(np.abs(matrix).max(axis=0), 1e-12) / 127.0
    stored.graph.initializer.remove(weights)
    stored.graph.initializer.extend(
        [
            numpy_helper.from_array(np.clip(np.round(matrix / scale), -127, 127).astype(np.int8), f"{name}_int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
        ]
    )
    dequantise = [
        helper.make_node("Cast", [f"{name}_int8"], [f"{name}_cast"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{name}_cast", f"{name}_scale"], [name]),
    ]
    for node in reversed(dequantise):
        stored.graph.node.insert(0, node)
    onnx.checker.check_model(stored)
    return stored


@dataclass
class HeadDesign:
    """The head chosen on validation, with the figures that chose it."""

    embedding_head: LinearHead
    lexical: Lexical | None
    lexical_head: LinearHead | None
    encoder_weight: float
    choices: dict


def choose_head(
    pooled: dict[str, np.ndarray],
    texts: dict[str, list[str]],
    targets: dict[str, np.ndarray],
    *,
    joint_head: LinearHead | None,
    head_c: float,
    lexical: bool,
    lexical_max_features: int,
    lexical_c: float,
) -> HeadDesign:
    """Fit the candidates on the training split and keep what scores best on validation (micro-F1 at the best
    global threshold): the embedding head (the one trained jointly with the encoder, or a logistic regression at
    each strength), the lexical classifier's strength (``lexical_c``, or each of ``LEXICAL_C_CHOICES`` when it is
    0) together with the fusion weight between the two."""
    choices: dict = {"embedding_head": {}}
    candidates: dict[str, LinearHead] = {}
    if joint_head is not None:
        candidates["joint"] = joint_head
    for c in (head_c,) if head_c else HEAD_C_CHOICES:
        candidates[f"logistic C={c}"] = standardised_head(pooled["train"], targets["train"], c)
    scored = {
        name: validation_f1(head.logits(pooled["validation"]), targets["validation"])
        for name, head in candidates.items()
    }
    choices["embedding_head"] = {name: round(f1, 4) for name, f1 in scored.items()}
    best_name = max(scored, key=scored.get)
    embedding_head = candidates[best_name]
    choices["embedding_head_chosen"] = best_name
    log.info("embedding head: %s (validation micro-F1 %s)", best_name, choices["embedding_head"])
    if not lexical:
        return HeadDesign(embedding_head, None, None, 1.0, choices)
    vectorizer = Lexical(texts["train"], lexical_max_features)
    train_features = vectorizer.features(texts["train"])
    validation_features = vectorizer.features(texts["validation"])
    embedding_logits = embedding_head.logits(pooled["validation"])
    fits: dict[float, tuple[LinearHead, dict[float, float]]] = {}
    for c in (lexical_c,) if lexical_c else LEXICAL_C_CHOICES:
        head = fit_logistic(train_features, targets["train"], c)
        lexical_logits = head.logits(validation_features)
        fits[c] = (
            head,
            {
                float(w): validation_f1(w * embedding_logits + (1 - w) * lexical_logits, targets["validation"])
                for w in FUSION_GRID
            },
        )
    # At equal validation micro-F1 (4 decimals) the stronger regularisation and the larger encoder weight win.
    best = {c: max(fusion, key=lambda w: (round(fusion[w], 4), w)) for c, (_, fusion) in fits.items()}
    chosen_c = max(fits, key=lambda c: (round(fits[c][1][best[c]], 4), -c))
    lexical_head, fusion = fits[chosen_c]
    weight = best[chosen_c]
    choices["lexical_c_validation_micro_f1"] = {str(c): round(fits[c][1][best[c]], 4) for c in fits}
    choices["lexical_c_chosen"] = chosen_c
    choices["fusion_validation_micro_f1"] = {str(w): round(f1, 4) for w, f1 in fusion.items()}
    choices["encoder_weight"] = weight
    choices["lexical_features"] = vectorizer.size
    log.info(
        "fusion: lexical C=%g, encoder weight %.1f (validation micro-F1 %.4f; lexical alone %.4f, embedding alone "
        "%.4f; best fusion by C %s)",
        chosen_c,
        weight,
        fusion[weight],
        fusion[0.0],
        fusion[1.0],
        choices["lexical_c_validation_micro_f1"],
    )
    return HeadDesign(embedding_head, vectorizer, lexical_head, weight, choices)
