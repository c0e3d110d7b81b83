"""Recording corrections: a curator's new label set for one prediction in one taxonomy becomes an append-only
AnnotationEvent holding only the difference, so two curators saving at once both keep their change.

The web form and ``POST /api/v1/predictions/<id>/annotations`` both go through :func:`record_correction`,
so their rules (which labels are allowed, length limits, proposals) cannot drift apart.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select

from .annotations import current_labels, label_decisions, label_map
from .extensions import db
from .models import AnnotationEvent, LabelProposal, ModelVersion, Prediction, PredictionResult, Taxonomy, User, utcnow

# Longer is a pasted sentence, not a label; the same limit as the label_proposals column.
MAX_LABEL_CHARS = 200
MAX_NOTE_CHARS = 2000
# They separate labels in CSV exports and in the trainer's CSV reader.
LABEL_SEPARATORS = ("|", ";")


class CorrectionError(ValueError):
    """The correction cannot be recorded as sent; the message says what to change."""


def check_label(raw: object) -> str:
    """A label as stored: stripped, non-empty, at most MAX_LABEL_CHARS, no separators or control characters."""
    if not isinstance(raw, str):
        raise CorrectionError("labels must be strings")
    label = " ".join(raw.split())
    if not label:
        raise CorrectionError("a label is empty")
    if len(label) > MAX_LABEL_CHARS:
        raise CorrectionError(
            f"a label is {len(label)} characters long; labels have at most {MAX_LABEL_CHARS} characters"
        )
    if any(unicodedata.category(ch).startswith("C") for ch in label):
        raise CorrectionError(f"label {label[:40]!r} contains a control character")
    if any(sep in label for sep in LABEL_SEPARATORS):
        raise CorrectionError(f"label {label!r} contains | or ; (they separate labels in CSV files)")
    return label


def check_note(raw: object) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise CorrectionError("note must be a string")
    note = raw.strip()
    if "\x00" in note:
        raise CorrectionError("note contains a NUL character")
    if any(unicodedata.category(ch) == "Cs" for ch in note):  # no database can store "\ud800" as text
        raise CorrectionError("note contains a lone surrogate (such as \\ud800), which is not valid Unicode text")
    if len(note) > MAX_NOTE_CHARS:
        raise CorrectionError(f"note is {len(note)} characters long; notes have at most {MAX_NOTE_CHARS}")
    return note


def taxonomy_labels(taxonomy: Taxonomy) -> list[str]:
    """Labels a correction may use without a proposal: every model version's labels plus accepted proposals,
    renamed, merged and split by the taxonomy's label changes."""
    return sorted(label_map(taxonomy.id).vocabulary(stored_labels(taxonomy)))


def stored_labels(taxonomy: Taxonomy) -> set[str]:
    """Every name the taxonomy's versions and accepted proposals use, including names label changes retired."""
    labels: set[str] = set()
    for version_labels in db.session.scalars(
        select(ModelVersion.labels).where(ModelVersion.taxonomy_id == taxonomy.id)
    ):
        labels.update(version_labels)
    labels.update(accepted_labels(taxonomy))
    return labels


def accepted_labels(taxonomy: Taxonomy) -> list[str]:
    """Labels admins accepted (under their final name): the trainer adds them to the next run's label set."""
    rows = db.session.scalars(
        select(LabelProposal.final_label).where(
            LabelProposal.taxonomy_id == taxonomy.id, LabelProposal.status == "accepted"
        )
    )
    return sorted({label for label in rows if label})


def pending_labels(taxonomy: Taxonomy) -> set[str]:
    return set(
        db.session.scalars(
            select(LabelProposal.label).where(
                LabelProposal.taxonomy_id == taxonomy.id, LabelProposal.status == "proposed"
            )
        )
    )


@dataclass
class TaxonomyState:
    """One prediction in one taxonomy as a curator sees it: what the model said, the events, the labels now."""

    taxonomy: Taxonomy
    result: PredictionResult | None
    events: list[AnnotationEvent]
    labels: list[str]

    @property
    def latest_event_id(self) -> int:
        return max((e.id for e in self.events), default=0)


def taxonomy_state(prediction: Prediction, taxonomy: Taxonomy) -> TaxonomyState:
    result = next((r for r in prediction.results if r.taxonomy_id == taxonomy.id), None)
    events = sorted((e for e in prediction.events if e.taxonomy_id == taxonomy.id), key=lambda e: (e.created_at, e.id))
    return TaxonomyState(taxonomy, result, events, current_labels(result, events))


@dataclass
class Outcome:
    """What saving did: the event recorded (None when nothing changed) and events saved by others meanwhile."""

    state: TaxonomyState
    event: AnnotationEvent | None
    concurrent: list[AnnotationEvent] = field(default_factory=list)
    proposals: list[LabelProposal] = field(default_factory=list)


def record_correction(
    prediction: Prediction,
    taxonomy: Taxonomy,
    user: User,
    labels: Iterable[object],
    note: object = "",
    propose: Iterable[object] = (),
    based_on: int | None = None,
) -> Outcome:
    """Record ``labels`` (the full new set, plus any ``propose``d new labels) as the diff against what the
    curator saw: the state after event ``based_on`` (the latest event when None). Changes others made since
    are kept; an event only carries this curator's own changes. No change and no note records nothing."""
    wanted = {check_label(label) for label in labels}
    proposed = {check_label(label) for label in propose}
    note = check_note(note)
    state = taxonomy_state(prediction, taxonomy)
    if based_on is None:
        seen, concurrent = state.labels, []
    else:
        seen = current_labels(state.result, [e for e in state.events if e.id <= based_on])
        concurrent = [e for e in state.events if e.id > based_on]
    decisions = label_decisions(taxonomy.id)
    proposed = {decisions.get(label) or label for label in proposed}  # an accepted proposal under its final name
    known = set(taxonomy_labels(taxonomy))
    allowed = known | pending_labels(taxonomy) | set(seen) | set(state.labels)
    unknown = sorted(wanted - allowed)
    if unknown:
        renamed = {label: label_map(taxonomy.id).vocabulary([label]) for label in unknown}
        hints = "".join(f"; {old} is now {' or '.join(new)}" for old, new in renamed.items() if new != [old])
        raise CorrectionError(
            f"not labels of {taxonomy.name} ({taxonomy.slug}): {', '.join(unknown)}{hints}; "
            "check the spelling or propose them as new labels"
        )
    proposals = _proposals(taxonomy, prediction, user, proposed - known)
    wanted |= proposed
    added = sorted(label for label in wanted - set(seen) if label not in state.labels)
    removed = sorted(label for label in set(seen) - wanted if label in state.labels)
    if not (added or removed or note):
        db.session.commit()  # proposals alone are still worth keeping
        return Outcome(state, None, concurrent, proposals)
    event = AnnotationEvent(
        prediction=prediction, taxonomy_id=taxonomy.id, user=user, added=added, removed=removed, note=note
    )
    db.session.add(event)
    db.session.commit()
    state.events.append(event)
    state.labels = current_labels(state.result, state.events)
    return Outcome(state, event, concurrent, proposals)


def _proposals(taxonomy: Taxonomy, prediction: Prediction, user: User, labels: set[str]) -> list[LabelProposal]:
    """One proposal per new label and taxonomy (a second curator proposing it reuses the first's)."""
    out = []
    for label in sorted(labels):
        proposal = db.session.scalar(
            select(LabelProposal).where(LabelProposal.taxonomy_id == taxonomy.id, LabelProposal.label == label)
        )
        if proposal is not None and proposal.status == "rejected":
            raise CorrectionError(f"the label {label!r} was proposed before and rejected by an admin")
        if proposal is None:
            proposal = LabelProposal(taxonomy=taxonomy, label=label, prediction_id=prediction.id, proposed_by=user)
            db.session.add(proposal)
        out.append(proposal)
    return out


def decide_proposal(proposal: LabelProposal, admin: User, accept: bool, final_label: object = None) -> None:
    """Accept (under ``final_label`` when given: a rename) or reject a proposal; decisions are final."""
    if proposal.status != "proposed":
        raise CorrectionError(f"the proposal {proposal.label!r} was already {proposal.status}")
    if accept:
        proposal.final_label = check_label(final_label) if final_label else proposal.label
    proposal.status = "accepted" if accept else "rejected"
    proposal.decided_by = admin
    proposal.decided_at = utcnow()
    db.session.commit()
