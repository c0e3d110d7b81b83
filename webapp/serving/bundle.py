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
storage form. Unpacking it is bounded before anything is extracted (plain members only, their declared sizes
summed against a cap, ``bundle.json`` capped on its own, no sparse members) and records each file's sha256 in
``sha256.json`` beside them, which :func:`verify_files` checks before a cached copy is loaded again. Every
manifest field is checked for type and size by :meth:`Manifest.validate`. This module imports neither Flask nor
torch so both packages can use it.
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
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

from ..json_values import check_json, no_constant

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
# What an archive may unpack to (its members' declared sizes, summed) and what bundle.json may weigh: checked before
# a byte is extracted, so a gzip bomb costs neither memory nor disk (the server passes its MAX_BUNDLE_* settings).
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
# tarfile reads a pax or GNU long-name header whole into memory: ours are a few hundred bytes.
MAX_TAR_HEADER_BYTES = 64 * 1024
# The per-file sha256s of an unpacked bundle, written beside its files by :func:`unpack` and checked by
# :func:`verify_files` before a cached copy is loaded again.
DIGESTS_FILE = "sha256.json"
# Manifest sizes: free-form objects (metrics, training_data) are shown on pages and stored with every version.
MAX_LABELS = 10_000
MAX_FREE_FORM_BYTES = 512 * 1024
MAX_FREE_FORM_DEPTH = 8
MAX_NAME_CHARS = 200
MAX_BASE_MODEL_CHARS = 500
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


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


def _refuse(name: str, problem: str) -> NoReturn:
    raise BundleError(f"bundle.json {name}: {problem}")


def _check_string(name: str, value: Any, max_chars: int, *, required: bool = False) -> None:
    if not isinstance(value, str):
        _refuse(name, f"must be a string, not {type(value).__name__}")
    if required and not value.strip():
        _refuse(name, "is empty")
    if len(value) > max_chars:
        _refuse(name, f"is {len(value)} characters long; at most {max_chars} are allowed")
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        _refuse(name, "contains a control character")


def _check_free_form(name: str, value: Any) -> None:
    """A JSON object of bounded depth and size: it is stored with the version and read by every models page."""
    if not isinstance(value, dict):
        _refuse(name, f"must be a JSON object, not {type(value).__name__}")
    try:  # the request bodies' check: too deep, NaN, a NUL or an unpaired surrogate
        check_json(value, MAX_FREE_FORM_DEPTH)
    except ValueError as exc:
        _refuse(name, str(exc).removeprefix("it "))
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > MAX_FREE_FORM_BYTES:
        _refuse(name, f"takes {size} bytes; at most {MAX_FREE_FORM_BYTES} are allowed")


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
        """Check every field's type and size in one place; each message starts with the field it is about, so an
        upload's 422 names it (label naming rules shared with corrections are checked by the registry)."""
        if self.format_version == 1:
            raise BundleError(FORMAT_1_MESSAGE)
        if self.format_version != FORMAT_VERSION:
            raise BundleError(f"unsupported bundle format_version {self.format_version!r} (expected {FORMAT_VERSION})")
        _check_string("taxonomy_slug", self.taxonomy_slug, 63)
        if not SLUG_PATTERN.match(self.taxonomy_slug):
            _refuse("taxonomy_slug", f"{self.taxonomy_slug!r} must be lowercase letters, digits and '-'")
        _check_string("taxonomy_name", self.taxonomy_name, MAX_NAME_CHARS, required=True)
        _check_string("base_model", self.base_model, MAX_BASE_MODEL_CHARS)
        _check_string("created_at", self.created_at, 64)
        _check_string("encoder_sha256", self.encoder_sha256, 64)
        if self.encoder_sha256 and not SHA256_PATTERN.match(self.encoder_sha256):
            _refuse("encoder_sha256", "must be 64 lowercase hex digits (or empty)")
        self._validate_labels()
        if not _integer_in(self.max_length, 8, 4096):
            _refuse("max_length", f"{self.max_length!r} must be an integer between 8 and 4096")
        if not _integer_in(self.max_windows, 1, 32):
            _refuse("max_windows", f"{self.max_windows!r} must be an integer between 1 and 32")
        if not _integer_in(self.window_overlap, 0, self.max_length // 2 - 1):
            _refuse("window_overlap", f"{self.window_overlap!r} must be an integer below half of max_length")
        if not isinstance(self.best_guess, bool):
            _refuse("best_guess", "must be true or false")
        if not _number_in(self.guess_floor, 0.0, 1.0) or self.guess_floor == 1.0:
            _refuse("guess_floor", "must be a number from 0 up to 1")
        if self.domain_threshold is not None and (not _number_in(self.domain_threshold, -1.0, 1.0)):
            _refuse("domain_threshold", "must be null or a number between -1 and 1")
        _check_free_form("training_data", self.training_data)
        _check_free_form("metrics", self.metrics)

    def _validate_labels(self) -> None:
        if not isinstance(self.labels, list):
            _refuse("labels", f"must be a list of label names, not {type(self.labels).__name__}")
        if not 2 <= len(self.labels) <= MAX_LABELS:
            _refuse("labels", f"a bundle needs 2 to {MAX_LABELS} labels, this one has {len(self.labels)}")
        seen: set[str] = set()
        for i, label in enumerate(self.labels):
            if not isinstance(label, str) or not label.strip():
                _refuse(f"labels[{i}]", "every label must be a non-empty string")
            if label in seen:
                _refuse(f"labels[{i}]", f"labels are not unique: {label[:80]!r} appears twice")
            seen.add(label)
        if not isinstance(self.thresholds, list):
            _refuse("thresholds", f"must be a list of numbers, not {type(self.thresholds).__name__}")
        if len(self.thresholds) != len(self.labels):
            _refuse("thresholds", f"{len(self.thresholds)} thresholds for {len(self.labels)} labels")
        for i, threshold in enumerate(self.thresholds):
            if not _number_in(threshold, 0.0, 1.0) or threshold in (0.0, 1.0):
                _refuse(f"thresholds[{i}]", "every threshold must be a number strictly between 0 and 1")

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


def read_manifest(bundle_dir: str | os.PathLike[str], *, max_bytes: int = MAX_MANIFEST_BYTES) -> Manifest:
    """Read and check ``bundle.json`` (at most ``max_bytes``) and the presence of the other files."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle directory")
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"bundle is missing {MANIFEST_FILE}")
    if path.stat().st_size > max_bytes:
        raise BundleError(f"{MANIFEST_FILE} is {path.stat().st_size} bytes, over the {max_bytes} byte limit")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)
    except ValueError as exc:  # undecodable bytes, bad JSON, an integer past Python's 4,300 digits
        raise BundleError(f"bundle.json is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BundleError("bundle.json nests too deeply") from exc
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


class _CappedReader(io.RawIOBase):
    """A readable stream that fails once more than ``cap`` bytes came out of ``inner`` (a gzip stream): however
    the archive lies, decompressing it stops there."""

    def __init__(self, inner: IO[bytes], cap: int) -> None:
        super().__init__()
        self.inner, self.cap, self.count = inner, cap, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.inner.read(min(len(view), self.cap + 1 - self.count))
        self.count += len(data)
        if self.count > self.cap:
            raise BundleError(f"bundle archive unpacks to more than {self.cap} bytes")
        view[: len(data)] = data
        return len(data)


class _BundleTarInfo(tarfile.TarInfo):
    """tarfile reads extended headers and sparse maps into memory whatever size they declare, and a sparse member
    unpacks to its declared real size (up to exabytes) from a few bytes: refuse both before they are read."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_HEADER_TYPES and self.size > MAX_TAR_HEADER_BYTES:
            raise BundleError(f"bundle archive has a {self.size} byte extended tar header")
        return super()._proc_member(tarfile)

    def _refuse_sparse(self, *args: Any) -> NoReturn:
        raise BundleError("bundle archive holds a sparse member; bundles are plain files")

    _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


_EXTENDED_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _copy_hashing(source: IO[bytes], path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _extract(archive: bytes, staging: Path, max_bytes: int, max_manifest_bytes: int) -> dict[str, str]:
    """Stream the bundle files into ``staging``, checking each member's declared size (and their sum) before
    reading it; returns each file's sha256."""
    digests: dict[str, str] = {}
    total = 0
    # Headers and padding take a few KiB beyond the members' own bytes.
    stream = _CappedReader(gzip.GzipFile(fileobj=io.BytesIO(archive)), max_bytes + 1024 * 1024)
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BundleTarInfo) as tar:
        for member in tar:
            # `tar czf bundle.tar.gz -C DIR .` names the folder "./" and each file "./bundle.json": the same bundle.
            name = member.name.removeprefix("./")
            if member.isdir() and name in ("", "."):
                continue
            if name == "model.onnx":
                raise BundleError(FORMAT_1_MESSAGE)
            if name not in BUNDLE_FILES or not member.isfile() or member.issparse():
                raise BundleError(f"unexpected entry {member.name!r} in bundle archive")
            if name in digests:
                raise BundleError(f"bundle archive holds {name} twice")
            if name == MANIFEST_FILE and member.size > max_manifest_bytes:
                raise BundleError(f"{MANIFEST_FILE} is {member.size} bytes, over the {max_manifest_bytes} byte limit")
            total += member.size
            if total > max_bytes:
                raise BundleError(f"bundle archive unpacks to more than {max_bytes} bytes (at {name})")
            extracted = tar.extractfile(member)
            assert extracted is not None
            digests[name] = _copy_hashing(extracted, staging / name)
    return digests


def unpack(
    archive: bytes,
    target: str | os.PathLike[str],
    *,
    keep_existing: bool = False,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_manifest_bytes: int = MAX_MANIFEST_BYTES,
) -> Manifest:
    """Unpack an archive made by :func:`pack` into ``target`` (atomically) and return its manifest.

    Only the bundle files are accepted, as plain files at the top level, unpacking to at most ``max_bytes``
    (``bundle.json`` to ``max_manifest_bytes``); their sha256s are written beside them (:data:`DIGESTS_FILE`).
    ``keep_existing`` is for a content-addressed target (the model cache): when another process put it in place
    first, its copy stays, since that process may be reading it, and ours is dropped.
    """
    if len(archive) > MAX_ARCHIVE_BYTES:
        raise BundleError(f"bundle archive is {len(archive)} bytes, over the {MAX_ARCHIVE_BYTES} byte limit")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            digests = _extract(archive, staging, max_bytes, max_manifest_bytes)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # the disk (full, read-only), not the bundle
                raise
            raise BundleError(f"not a readable .tar.gz bundle: {exc}") from exc
        manifest = read_manifest(staging, max_bytes=max_manifest_bytes)
        (staging / DIGESTS_FILE).write_text(json.dumps(digests, sort_keys=True), encoding="utf-8")
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


def read_digests(bundle_dir: Path) -> dict[str, str]:
    """The sha256s :func:`unpack` recorded for ``bundle_dir``'s files (empty when it recorded none)."""
    try:
        digests = json.loads((bundle_dir / DIGESTS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return digests if isinstance(digests, dict) else {}


def verify_files(bundle_dir: Path) -> dict[str, str]:
    """Hash each file of an unpacked bundle and compare with what :func:`unpack` recorded from the archive whose
    sha256 the database holds; returns the digests (so loading hashes nothing twice). Raises :class:`BundleError`
    naming the first file that differs."""
    recorded = read_digests(bundle_dir)
    actual = {}
    for name in BUNDLE_FILES:
        if name not in recorded:
            raise BundleError(f"no recorded sha256 for {name}")
        actual[name] = sha256_file(bundle_dir / name)
        if actual[name] != recorded[name]:
            raise BundleError(f"{name} does not match the sha256 recorded from the artifact")
    return actual


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
