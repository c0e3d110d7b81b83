"""The model bundle: the one contract between `trainer` (writes it) and `webapp` (serves it).

A bundle (format 2) is a directory holding

- ``encoder.onnx``: the shared int8 encoder; inputs ``input_ids`` and ``attention_mask`` (int64, [batch, seq]),
  output ``pooled`` ([batch, hidden], mean-pooled over the mask, not normalised). The server reads an abstract in
  windows of ``max_length`` tokens (up to ``max_windows``, ``window_overlap`` tokens shared) and averages the
  windows' pooled vectors weighted by their token counts. Bundles whose encoder bytes are equal share one
  encoder pass per abstract, whatever the number of taxonomies (PRODUCT principle 8);
- ``head.onnx``: this taxonomy's int8 head; inputs ``pooled`` ([batch, hidden]) and, when it has a lexical part,
  ``text`` (string, [batch, 1]); outputs ``logits`` ([batch, labels]: the embedding head and the TF-IDF
  classifier fused) and ``domain`` ([batch]: cosine similarity to the nearest training paper, for off-domain
  flags);
- ``tokenizer.json``: a Hugging Face ``tokenizers`` file;
- ``bundle.json``: the manifest described by :class:`Manifest`.

Format 1 (one ``model.onnx`` per taxonomy, 128 tokens, no lexical part) is refused with a message saying so; the
shipped format-2 bundles replace such active versions on the next start (``models import-defaults``).

Its ``.tar.gz`` (packed deterministically, so equal content gives an equal sha256) is the upload and
storage form. This module imports neither Flask nor torch so both packages can use it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2
ENCODER_FILE = "encoder.onnx"
HEAD_FILE = "head.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "bundle.json"
BUNDLE_FILES = (ENCODER_FILE, HEAD_FILE, TOKENIZER_FILE, MANIFEST_FILE)
ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "pooled"
HEAD_OUTPUTS = ("logits", "domain")
HEAD_TEXT_INPUT = "text"
FORMAT_1_MESSAGE = (
    "this is a format-1 bundle (one model.onnx per taxonomy); papertag now serves format 2 (a shared encoder.onnx "
    "and a head.onnx per taxonomy): retrain it with `make train`"
)
SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# A bundle archive larger than this is refused before it is unpacked (encoder ~23 MB + head a few MB).
MAX_ARCHIVE_BYTES = 200 * 1024 * 1024


def _number_in(value: Any, low: float, high: float) -> bool:
    """A JSON number (not a boolean) within [low, high]; huge integers and NaN are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return low <= float(value) <= high
    except OverflowError:
        return False


def _integer_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class BundleError(ValueError):
    """A bundle that cannot be served; the message says what is wrong with it."""


def compose_text(title: str | None, abstract: str) -> str:
    """The single text the model reads: trainer and server must build it the same way."""
    title = (title or "").strip()
    abstract = abstract.strip()
    return f"{title}. {abstract}" if title else abstract


@dataclass
class Manifest:
    """Contents of ``bundle.json``."""

    taxonomy_slug: str
    taxonomy_name: str
    labels: list[str]
    thresholds: list[float]
    max_length: int
    base_model: str
    created_at: str
    max_windows: int = 1
    window_overlap: int = 0
    best_guess: bool = False
    guess_floor: float = 0.0
    domain_threshold: float | None = None
    encoder_sha256: str = ""
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        if self.format_version == 1:
            raise BundleError(FORMAT_1_MESSAGE)
        if self.format_version != FORMAT_VERSION:
            raise BundleError(f"unsupported bundle format_version {self.format_version!r} (expected {FORMAT_VERSION})")
        if not isinstance(self.taxonomy_slug, str) or not isinstance(self.taxonomy_name, str):
            raise BundleError("taxonomy_slug and taxonomy_name must be strings")
        if not isinstance(self.labels, list) or not isinstance(self.thresholds, list):
            raise BundleError("labels and thresholds must be lists")
        if not SLUG_PATTERN.match(self.taxonomy_slug or ""):
            raise BundleError(f"taxonomy slug {self.taxonomy_slug!r} must be lowercase letters, digits and '-'")
        if not self.taxonomy_name or not self.taxonomy_name.strip():
            raise BundleError("taxonomy name is empty")
        if len(self.labels) < 2:
            raise BundleError(f"a bundle needs at least 2 labels, this one has {len(self.labels)}")
        if any(not isinstance(label, str) or not label.strip() for label in self.labels):
            raise BundleError("every label must be a non-empty string")
        if len(set(self.labels)) != len(self.labels):
            raise BundleError("labels are not unique")
        if len(self.thresholds) != len(self.labels):
            raise BundleError(f"{len(self.thresholds)} thresholds for {len(self.labels)} labels")
        if any(not _number_in(t, 0.0, 1.0) or t in (0.0, 1.0) for t in self.thresholds):
            raise BundleError("every threshold must be a number strictly between 0 and 1")
        if not _integer_in(self.max_length, 8, 4096):
            raise BundleError(f"max_length {self.max_length!r} must be an integer between 8 and 4096")
        if not _integer_in(self.max_windows, 1, 32):
            raise BundleError(f"max_windows {self.max_windows!r} must be an integer between 1 and 32")
        if not _integer_in(self.window_overlap, 0, self.max_length // 2 - 1):
            raise BundleError(f"window_overlap {self.window_overlap!r} must be an integer below half of max_length")
        if not isinstance(self.best_guess, bool):
            raise BundleError("best_guess must be true or false")
        if not _number_in(self.guess_floor, 0.0, 1.0) or self.guess_floor == 1.0:
            raise BundleError("guess_floor must be a number from 0 up to 1")
        if self.domain_threshold is not None and (not _number_in(self.domain_threshold, -1.0, 1.0)):
            raise BundleError("domain_threshold must be null or a number between -1 and 1")
        if not isinstance(self.training_data, dict) or not isinstance(self.metrics, dict):
            raise BundleError("training_data and metrics must be JSON objects")

    @property
    def read_tokens(self) -> int:
        """How many content tokens the windows cover: text past them is not read."""
        content = self.max_length - 2
        return content + (self.max_windows - 1) * (content - self.window_overlap)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = set(cls.__dataclass_fields__)
        if data.get("format_version", 1) == 1:
            raise BundleError(FORMAT_1_MESSAGE)
        missing = {"taxonomy_slug", "taxonomy_name", "labels", "thresholds", "max_length"} - set(data)
        if missing:
            raise BundleError(f"bundle.json lacks {', '.join(sorted(missing))}")
        unknown = set(data) - known
        if unknown:
            raise BundleError(f"bundle.json has unknown keys: {', '.join(sorted(unknown))}")
        data = {"base_model": "", "created_at": "", **data}
        manifest = cls(**data)
        manifest.validate()
        return manifest


def read_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Read and check ``bundle.json`` and the presence of the other files."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle directory")
    if not (bundle_dir / MANIFEST_FILE).is_file():
        raise BundleError(f"bundle is missing {MANIFEST_FILE}")
    try:
        data = json.loads((bundle_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle.json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError("bundle.json must hold a JSON object")
    try:
        manifest = Manifest.from_dict(data)
    except TypeError as exc:
        raise BundleError(f"bundle.json is malformed: {exc}") from exc
    for name in BUNDLE_FILES:
        if not (bundle_dir / name).is_file():
            raise BundleError(f"bundle is missing {name}")
    return manifest


def write_bundle(
    target: str | os.PathLike[str], manifest: Manifest, encoder_path: Path, head_path: Path, tokenizer_path: Path
) -> Path:
    """Write a bundle directory atomically: build it beside ``target``, then rename into place. The manifest
    records the encoder's sha256, the identity under which taxonomies share it."""
    manifest.encoder_sha256 = sha256_file(encoder_path)
    manifest.validate()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copyfile(encoder_path, staging / ENCODER_FILE)
        shutil.copyfile(head_path, staging / HEAD_FILE)
        shutil.copyfile(tokenizer_path, staging / TOKENIZER_FILE)
        (staging / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def pack(bundle_dir: str | os.PathLike[str]) -> bytes:
    """The bundle as a deterministic ``.tar.gz`` (fixed order, mtimes and owners)."""
    read_manifest(bundle_dir)
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name in BUNDLE_FILES:
            data = (Path(bundle_dir) / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def unpack(archive: bytes, target: str | os.PathLike[str], *, keep_existing: bool = False) -> Manifest:
    """Unpack an archive made by :func:`pack` into ``target`` (atomically) and return its manifest.

    Only the bundle files are accepted, as plain files at the top level. ``keep_existing`` is for a
    content-addressed target (the model cache): when another process put it in place first, its copy stays, since
    that process may be reading it, and ours is dropped.
    """
    if len(archive) > MAX_ARCHIVE_BYTES:
        raise BundleError(f"bundle archive is {len(archive)} bytes, over the {MAX_ARCHIVE_BYTES} byte limit")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                members = tar.getmembers()
                if any(member.name == "model.onnx" for member in members):
                    raise BundleError(FORMAT_1_MESSAGE)
                for member in members:
                    if member.name not in BUNDLE_FILES or not member.isfile():
                        raise BundleError(f"unexpected entry {member.name!r} in bundle archive")
                for member in members:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    (staging / member.name).write_bytes(extracted.read())
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # the disk (full, read-only), not the bundle
                raise
            raise BundleError(f"not a readable .tar.gz bundle: {exc}") from exc
        manifest = read_manifest(staging)
        if keep_existing and (target / MANIFEST_FILE).is_file():
            shutil.rmtree(staging)
            return manifest
        if target.exists() and not keep_existing:
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not keep_existing or not (target / MANIFEST_FILE).is_file():
                raise
            shutil.rmtree(staging)  # another process renamed its copy into place between our check and rename
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
