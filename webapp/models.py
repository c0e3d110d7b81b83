"""Database models (SQLAlchemy 2.0 typed). The database is the single source of truth: model artifacts,
which version is active, every prediction with the version and thresholds that made it, and the
append-only annotation events that curation (issue 4) records."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from flask_login import UserMixin
from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint, select
from sqlalchemy import false as sa_false
from sqlalchemy.orm import Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

from .extensions import db
from .serving.stored import Layout

# Prediction.source of a paper imported from the base data (webapp/curation/label_issues.py), not submitted: live
# quality, learned thresholds, the review queue and replay leave it out, as no served model answered it.
DATASET_SOURCE = "dataset"
ROLES = ("curator", "adjudicator", "admin")


def utcnow() -> datetime:
    """Naive UTC timestamps: SQLite keeps no time zone, so every row uses the same convention."""
    return datetime.now(UTC).replace(tzinfo=None)


class Taxonomy(db.Model):
    """A named label set; at most one model version of it is active."""

    __tablename__ = "taxonomies"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(63), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    # Not a foreign key: taxonomy <-> version would be a cycle; the registry keeps it consistent.
    active_version_id: Mapped[str | None] = mapped_column(String(80), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(back_populates="taxonomy", order_by="ModelVersion.created_at")


class ModelArtifact(db.Model):
    """A bundle's deterministic ``.tar.gz``, addressed by its sha256 so every instance can fetch it."""

    __tablename__ = "model_artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(db.Model):
    """One imported bundle of one taxonomy: its labels, thresholds and manifest (metrics included)."""

    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"), index=True)
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("model_artifacts.sha256"))
    labels: Mapped[list[str]] = mapped_column(JSON)
    thresholds: Mapped[list[float]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    imported_by: Mapped[str | None] = mapped_column(String(120), default=None)
    # "ready" after import; "failed" when a worker could not load it (validation_error says why).
    status: Mapped[str] = mapped_column(String(20), default="ready")
    validation_error: Mapped[str | None] = mapped_column(Text, default=None)
    activated_at: Mapped[datetime | None] = mapped_column(default=None)
    activated_by: Mapped[str | None] = mapped_column(String(120), default=None)

    taxonomy: Mapped[Taxonomy] = relationship(back_populates="versions")
    artifact: Mapped[ModelArtifact] = relationship(lazy="raise")

    @property
    def metrics(self) -> dict[str, Any]:
        """The manifest's metrics; {} for a row stored before manifests were validated with a non-object there."""
        return _object(_object(self.manifest).get("metrics"))

    @property
    def test_metrics(self) -> dict[str, Any]:
        """The frozen-test-split figures models are compared by (the trainer writes them under ``test``)."""
        return _object(self.metrics.get("test"))

    @property
    def newest_metrics(self) -> dict[str, Any]:
        """The figures on papers newer than any training paper: how the model does in use."""
        return _object(self.metrics.get("newest"))

    @property
    def newest_baseline(self) -> dict[str, Any]:
        """The TF-IDF baseline's figures on the same newest papers."""
        return _object(_object(self.metrics.get("baseline")).get("newest"))


def _object(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else {}: pages read stored manifests written by older, looser imports."""
    return value if isinstance(value, dict) else {}


class ActivationEvent(db.Model):
    """Append-only log of activations; rollback walks it back."""

    __tablename__ = "activation_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"), index=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    previous_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"), default=None)
    # "import" (first version becomes active), "activate" or "rollback".
    action: Mapped[str] = mapped_column(String(20))
    actor: Mapped[str | None] = mapped_column(String(120), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Prediction(db.Model):
    """One submitted abstract. Never modified after it is stored; corrections are AnnotationEvents."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str | None] = mapped_column(Text, default=None)
    abstract: Mapped[str] = mapped_column(Text)
    text_sha256: Mapped[str] = mapped_column(String(64), index=True)
    # "web", "api", "batch", or DATASET_SOURCE: a base-data paper imported for the label-error queue, whose
    # result holds the data's labels and out-of-fold scores, not a served model's answer.
    source: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # The CSV batch job this came from.
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batch_jobs.id"), default=None, index=True)

    results: Mapped[list[PredictionResult]] = relationship(
        back_populates="prediction", cascade="all, delete-orphan", order_by="PredictionResult.id"
    )
    events: Mapped[list[AnnotationEvent]] = relationship(
        back_populates="prediction", order_by="AnnotationEvent.created_at"
    )


class Embedding(db.Model):
    """One prediction's pooled vector from one encoder, shared by every result whose bundle has that encoder (similar
    papers read it). ``vector``: its direction as int8, the largest component +-127 (``webapp/serving/stored.py``)."""

    __tablename__ = "embeddings"

    id: Mapped[int] = mapped_column(primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class PredictionResult(db.Model):
    """What one model version said about one prediction: every label's score and the thresholds used.

    Stored compactly (``webapp/serving/stored.py``): the scores packed in the version's label order, the thresholds
    only where they differ from the version's. Read ``scores`` and ``thresholds`` as label -> value dicts; a new row
    takes them as constructor arguments (its ``model_version_id`` names the version they are packed against)."""

    __tablename__ = "prediction_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"))
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), index=True)
    # Every label's score in the version's label order (varints of millionths); or, when the scores do not fit that
    # (another label set, more than 6 decimals), ``scores_by_label`` holds them as given.
    score_values: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    scores_by_label: Mapped[dict[str, float] | None] = mapped_column(JSON, default=None)
    labels: Mapped[list[str]] = mapped_column(JSON)
    # None: the version's thresholds (nearly every row).
    thresholds_by_label: Mapped[dict[str, float] | None] = mapped_column(JSON, default=None)
    # Smallest |score - threshold| over the labels: the review queue shows the most uncertain first.
    margin: Mapped[float] = mapped_column(Float, index=True)
    # Not a foreign key: SQLite cannot drop a column that is one, which migration 0012's downgrade does.
    embedding_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    # No label passed its threshold, so ``labels`` holds the most probable one, shown as below threshold.
    best_guess: Mapped[bool] = mapped_column(default=False, server_default=sa_false())
    # Cosine similarity to the nearest training paper, and whether it fell below the bundle's off-domain cut.
    domain: Mapped[float | None] = mapped_column(Float, default=None)
    off_domain: Mapped[bool] = mapped_column(default=False, server_default=sa_false())
    # Word pieces the encoder read of the text, of how many: the page says when text was not read.
    read_tokens: Mapped[int | None] = mapped_column(default=None)
    total_tokens: Mapped[int | None] = mapped_column(default=None)
    # The head's lexical (TF-IDF) part read the whole text, past the encoder's windows; None: not recorded.
    lexical_whole_text: Mapped[bool | None] = mapped_column(default=None)

    prediction: Mapped[Prediction] = relationship(back_populates="results")
    taxonomy: Mapped[Taxonomy] = relationship()
    predicted: Mapped[list[PredictedLabel]] = relationship(cascade="all, delete-orphan")
    embedding: Mapped[Embedding | None] = relationship(
        primaryjoin="foreign(PredictionResult.embedding_id) == Embedding.id"
    )

    def __init__(
        self, *, scores: Mapping[str, float], thresholds: Mapping[str, float] | None = None, **columns: Any
    ) -> None:
        """``thresholds`` default to the version's."""
        super().__init__(**columns)
        layout = version_layout(self.model_version_id)
        packed = layout.pack(scores, layout.thresholds if thresholds is None else thresholds)
        self.score_values, self.scores_by_label, self.thresholds_by_label = packed

    def add_label_rows(self, prediction: Prediction) -> None:
        """One ``predicted_labels`` row per label in ``labels``, naming ``prediction`` (this result's) and the
        taxonomy: what the label filter reads."""
        self.predicted = [
            PredictedLabel(prediction=prediction, taxonomy_id=self.taxonomy_id, label=label) for label in self.labels
        ]

    @property
    def scores(self) -> dict[str, float]:
        """Label -> score (6 decimals), in the version's label order."""
        if self.scores_by_label is not None:
            return dict(self.scores_by_label)
        return version_layout(self.model_version_id).scores(self.score_values or b"")

    @property
    def thresholds(self) -> dict[str, float]:
        """Label -> the threshold the result was decided with."""
        if self.thresholds_by_label is not None:
            return dict(self.thresholds_by_label)
        return dict(version_layout(self.model_version_id).thresholds)


# Version id -> its layout, for the whole process: a version id names one bundle's content (the taxonomy slug and
# its archive's sha256), so its labels and thresholds are the same in every database and never change (learned
# thresholds are a new version). Pages read them once, not per row, and a result read earlier decodes without a
# database at hand.
_layouts: dict[str, Layout] = {}


def version_layout(version_id: str) -> Layout:
    """The label order and thresholds results of ``version_id`` are packed against."""
    layout = _layouts.get(version_id)
    if layout is None:
        with db.session.no_autoflush:  # called while a caller builds rows: flush none of them half-made
            row = db.session.execute(
                select(ModelVersion.labels, ModelVersion.thresholds).where(ModelVersion.id == version_id)
            ).one_or_none()
        if row is None:
            raise LookupError(f"no model version {version_id!r}")
        layout = _layouts[version_id] = Layout.of(row.labels, row.thresholds)
    return layout


class Explanation(db.Model):
    """An occlusion explanation of one stored result by one model version, computed once and then read: the
    same (result, version) always explains the same way, and computing one costs a model run per sentence."""

    __tablename__ = "explanations"
    __table_args__ = (UniqueConstraint("result_id", "model_version_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("prediction_results.id"), index=True)
    model_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class PredictedLabel(db.Model):
    """One predicted label, a row each, so history can filter by label on SQLite and PostgreSQL alike."""

    __tablename__ = "predicted_labels"
    # A label filter reads its matches from this index alone, taxonomy included (migration 0021), not from each
    # row's result: a random page of a table of millions per match (9,250 matches at a million: 64 -> 14 ms).
    __table_args__ = (
        Index("ix_predicted_labels_label_prediction", "label", "prediction_id", "taxonomy_id", "result_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("prediction_results.id"), index=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"))
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"))  # the result's, kept beside it
    label: Mapped[str] = mapped_column(String(300))

    prediction: Mapped[Prediction] = relationship()


class CurrentLabel(db.Model):
    """One current label of a result a curator corrected (the model's labels with the active corrections applied),
    a row each, kept by the review command; so the label filter stays one indexed query. A result with a correction
    event is read from these rows (none: no label now), any other from ``predicted_labels``."""

    __tablename__ = "current_labels"
    __table_args__ = (
        Index("ix_current_labels_label_prediction", "label", "prediction_id"),
        # The labels curators gave, per taxonomy, from the index alone (search.taxonomy_labels, every history page).
        Index("ix_current_labels_taxonomy_label", "taxonomy_id", "label"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("prediction_results.id"), index=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"))
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"))  # the result's, kept beside it
    label: Mapped[str] = mapped_column(String(300))


class User(UserMixin, db.Model):
    """A curator or admin. Passwords are hashed; API tokens belong to a user and carry their role."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str | None] = mapped_column(String(300), default=None)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")

    @property
    def is_active(self) -> bool:  # Flask-Login asks this
        return self.active

    def get_id(self) -> str:
        """What Flask-Login keeps in the session cookie: this browser's session key (``signed_in_key``, set by
        ``webapp.access.accounts`` at sign-in and by the user loader), never the user id, so a session can be
        revoked."""
        key = getattr(self, "signed_in_key", None)
        if not key:
            raise AttributeError("no signed-in session key: sign in through webapp.access.accounts.sign_in")
        return key

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return bool(self.password_hash) and check_password_hash(self.password_hash or "", password)


class UserSession(db.Model):
    """One signed-in browser. The cookie carries a random key whose sha256 is stored here, so a session ends
    for good when its row is revoked (sign out, password change, deactivation), whatever the cookie says."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    user: Mapped[User] = relationship()


class ApiToken(db.Model):
    """A bearer token; only its sha256 is stored, the plain value is shown once at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(120), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)

    user: Mapped[User] = relationship(back_populates="tokens")

    @staticmethod
    def hash(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8")).hexdigest()

    @classmethod
    def issue(cls, user: User, name: str = "") -> tuple[ApiToken, str]:
        """A new token row and the plain token (``pt_`` + 43 url-safe characters)."""
        plain = "pt_" + secrets.token_urlsafe(32)
        return cls(user=user, token_sha256=cls.hash(plain), name=name), plain

    def usable(self, now: datetime | None = None) -> bool:
        now = now or utcnow()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now) and self.user.active


class AnnotationEvent(db.Model):
    """An append-only correction of one prediction in one taxonomy (who, when, added/removed, note).

    Issue 4 records these; history already filters reviewed / not reviewed by their presence.
    """

    __tablename__ = "annotation_events"
    # The review queue asks "has this prediction an event in this taxonomy?" for every candidate row.
    __table_args__ = (Index("ix_annotation_events_prediction_taxonomy", "prediction_id", "taxonomy_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    added: Mapped[list[str]] = mapped_column(JSON, default=list)
    removed: Mapped[list[str]] = mapped_column(JSON, default=list)
    note: Mapped[str] = mapped_column(Text, default="")
    # correction (labels added/removed), accepted (the labels are right as they stand), skipped (seen, not
    # decided), undo (reverses the event ``undoes_id`` with a new event; nothing is erased).
    kind: Mapped[str] = mapped_column(String(20), default="correction", server_default="correction")
    undoes_id: Mapped[int | None] = mapped_column(ForeignKey("annotation_events.id"), default=None)

    prediction: Mapped[Prediction] = relationship(back_populates="events")
    user: Mapped[User] = relationship()
    taxonomy: Mapped[Taxonomy] = relationship()


class LabelChange(db.Model):
    """An append-only rename, merge or split of a taxonomy's labels (``webapp/surgery.py`` reads the payload).
    Stored predictions and events keep their names; pages map them through the changes not undone. Undo sets
    ``undone_at``/``undone_by`` and deletes nothing."""

    __tablename__ = "label_changes"

    id: Mapped[int] = mapped_column(primary_key=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"), index=True)
    # "rename", "merge" or "split"
    kind: Mapped[str] = mapped_column(String(20))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    actor: Mapped[str | None] = mapped_column(String(120), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    undone_at: Mapped[datetime | None] = mapped_column(default=None)
    undone_by: Mapped[str | None] = mapped_column(String(120), default=None)
    note: Mapped[str] = mapped_column(Text, default="")

    taxonomy: Mapped[Taxonomy] = relationship()


PROPOSAL_STATUSES = ("proposed", "accepted", "rejected")


class LabelProposal(db.Model):
    """A label a curator needs that the taxonomy lacks. An admin accepts it (perhaps renamed) or rejects it;
    accepted labels are allowed in corrections and join the label set of the next training run."""

    __tablename__ = "label_proposals"
    __table_args__ = (UniqueConstraint("taxonomy_id", "label"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"), index=True)
    label: Mapped[str] = mapped_column(String(200))
    # The prediction whose correction first needed the label (context for the admin deciding).
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"), default=None)
    proposed_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(20), default="proposed", index=True)
    # The label as accepted: equal to ``label`` unless the admin renamed it.
    final_label: Mapped[str | None] = mapped_column(String(200), default=None)
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    decided_at: Mapped[datetime | None] = mapped_column(default=None)

    taxonomy: Mapped[Taxonomy] = relationship()
    proposed_by: Mapped[User] = relationship(foreign_keys=[proposed_by_id])
    decided_by: Mapped[User | None] = relationship(foreign_keys=[decided_by_id])


class TrainingRun(db.Model):
    """A training of one taxonomy: queued from the site or started by the trainer, with live progress."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"), index=True)
    # queued -> running -> finished | failed
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # epoch, step, total_steps, loss, eta_seconds, validation_micro_f1: whatever the trainer last reported.
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    candidate_version: Mapped[str | None] = mapped_column(String(80), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    requested_by: Mapped[str | None] = mapped_column(String(120), default=None)
    worker: Mapped[str | None] = mapped_column(String(120), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    taxonomy: Mapped[Taxonomy] = relationship()


class BatchJob(db.Model):
    """A CSV of abstracts tagged in the background. Its rows are stored with it and tagged in chunks
    (:class:`BatchChunk`) that any worker takes, so a chunk whose process died is redone by another one;
    ``worker`` and ``heartbeat_at`` say who last committed a chunk and when (a quiet batch waits for a worker)."""

    __tablename__ = "batch_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))
    created_by: Mapped[str | None] = mapped_column(String(120), default=None)
    # queued -> running -> finished | failed
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    # The header as uploaded, and where title (optional) and abstract are in it.
    columns: Mapped[list[str]] = mapped_column(JSON)
    title_column: Mapped[int | None] = mapped_column(Integer, default=None)
    abstract_column: Mapped[int] = mapped_column(Integer)
    total_rows: Mapped[int] = mapped_column(Integer)
    # Rows handled so far, tagged or skipped; progress is processed / total_rows.
    processed: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    worker: Mapped[str | None] = mapped_column(String(120), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class BatchRow(db.Model):
    """One uploaded CSV row, every cell as given; linked to its prediction once tagged, or given the reason it
    was skipped."""

    __tablename__ = "batch_rows"
    __table_args__ = (Index("ix_batch_rows_job_row", "job_id", "row_number", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("batch_jobs.id"))
    # As a spreadsheet numbers it: the header is row 1.
    row_number: Mapped[int] = mapped_column(Integer)
    cells: Mapped[list[str]] = mapped_column(JSON)
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"), default=None)
    skip_reason: Mapped[str | None] = mapped_column(Text, default=None)

    prediction: Mapped[Prediction | None] = relationship()


class BatchChunk(db.Model):
    """A run of a batch's taggable rows (``first_row``..``last_row``, spreadsheet numbers) that one worker tags and
    commits at once: the unit the job engine claims (``webapp/jobs/batch.py``), so several workers share one batch.
    queued -> running -> finished | failed, held like any job through ``worker`` and ``heartbeat_at``."""

    __tablename__ = "batch_chunks"
    __table_args__ = (Index("ix_batch_chunks_job_status", "job_id", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("batch_jobs.id"))
    first_row: Mapped[int] = mapped_column(Integer)
    last_row: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    worker: Mapped[str | None] = mapped_column(String(120), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)


class ReplayReport(db.Model):
    """What a candidate version would change if activated, computed by re-scoring stored abstracts with it and
    with the active version (``webapp/jobs/replay.py``); kept so the replay page shows it without recomputing."""

    __tablename__ = "replay_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"))
    candidate_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), index=True)
    active_version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    sample_size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(120), default=None)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    # A replay runs in the background: queued -> running -> finished | failed, ``processed`` of ``sample_size``
    # abstracts re-scored so far; ``worker``/``heartbeat_at`` say who holds it and whether they are alive.
    status: Mapped[str] = mapped_column(String(20), default="queued", server_default="finished", index=True)
    processed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    worker: Mapped[str | None] = mapped_column(String(120), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class LabelIssue(db.Model):
    """A paper whose current labels are likely wrong, by cleanlab's multi-label label-issue detection over
    out-of-fold scores (computed by the trainer, imported here). The paper is a stored prediction (base-data papers
    are imported as predictions), so curators fix it with the ordinary annotation events."""

    __tablename__ = "label_issues"
    __table_args__ = (UniqueConstraint("taxonomy_id", "prediction_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"), index=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"))
    # cleanlab's label quality score in [0, 1]: the lower, the likelier the given labels are wrong.
    quality: Mapped[float] = mapped_column(Float, index=True)
    # The labels the data gave, and the ones the out-of-fold model believes instead.
    given: Mapped[list[str]] = mapped_column(JSON, default=list)
    suggested: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Where the paper came from (data file and arXiv id, or "prediction").
    source: Mapped[str] = mapped_column(String(300), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    taxonomy: Mapped[Taxonomy] = relationship()
    prediction: Mapped[Prediction] = relationship()
