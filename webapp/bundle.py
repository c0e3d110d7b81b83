"""The model bundle: the one contract between `trainer` (writes it) and `webapp` (serves it).

A bundle is a directory holding

- ``model.onnx``: int8 ONNX graph; inputs ``input_ids`` and ``attention_mask`` (int64, [batch, seq]);
  outputs ``logits`` ([batch, labels]) and ``embedding`` ([batch, hidden], mean-pooled, L2-normalised);
- ``tokenizer.json``: a Hugging Face ``tokenizers`` file;
- ``bundle.json``: the manifest described by :class:`Manifest`.

Its ``.tar.gz`` (packed deterministically, so equal content gives an equal sha256) is the upload and
storage form. This module imports neither Flask nor torch so both packages can use it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "bundle.json"
BUNDLE_FILES = (MODEL_FILE, TOKENIZER_FILE, MANIFEST_FILE)
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits", "embedding")
SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# A bundle archive larger than this is refused before it is unpacked (the int8 MiniLM is ~23 MB).
MAX_ARCHIVE_BYTES = 200 * 1024 * 1024


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
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise BundleError(f"unsupported bundle format_version {self.format_version!r} (expected {FORMAT_VERSION})")
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
        if any(not isinstance(t, (int, float)) or math.isnan(t) or not 0.0 < t < 1.0 for t in self.thresholds):
            raise BundleError("every threshold must be a number strictly between 0 and 1")
        if not isinstance(self.max_length, int) or not 8 <= self.max_length <= 4096:
            raise BundleError(f"max_length {self.max_length!r} must be an integer between 8 and 4096")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = set(cls.__dataclass_fields__)
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
    for name in BUNDLE_FILES:
        if not (bundle_dir / name).is_file():
            raise BundleError(f"bundle is missing {name}")
    try:
        data = json.loads((bundle_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle.json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError("bundle.json must hold a JSON object")
    try:
        return Manifest.from_dict(data)
    except TypeError as exc:
        raise BundleError(f"bundle.json is malformed: {exc}") from exc


def write_bundle(target: str | os.PathLike[str], manifest: Manifest, model_path: Path, tokenizer_path: Path) -> Path:
    """Write a bundle directory atomically: build it beside ``target``, then rename into place."""
    manifest.validate()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copyfile(model_path, staging / MODEL_FILE)
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

    Only the three bundle files are accepted, as plain files at the top level. ``keep_existing`` is for a
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
