"""Recording corrections: a curator's new label set for one prediction in one taxonomy becomes an append-only
AnnotationEvent holding only the difference, so two curators saving at once both keep their change.

Every review, a correction, an accept, a skip or an undo, goes through :class:`ReviewCommand`: the web form,
``POST /api/v1/predictions/<id>/annotations`` and bulk actions, so their rules (which labels are allowed, length
limits, proposals, whose events one may undo) cannot drift apart.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select

from ..access.auth import ROLE_RANK
from ..extensions import db
from ..history.search import same_label
from ..models import AnnotationEvent, LabelProposal, ModelVersion, Prediction, PredictionResult, Taxonomy, User, utcnow
from .annotations import (
    LABEL_KINDS,
    current_labels,
    label_decisions,
    label_map,
    mapped_result,
    review_status,
    store_current_labels,
)

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

    @property
    def status(self) -> str | None:
        """ "accepted", "corrected" or None (not reviewed)."""
        return review_status(self.events)

    @property
    def model_labels(self) -> list[str]:
        """What the model said, in today's label names."""
        return mapped_result(self.result).labels if self.result else []

    def labels_after(self, event_id: int) -> list[str]:
        """The labels right after event ``event_id``: what a page based on it showed."""
        return current_labels(self.result, [e for e in self.events if e.id <= event_id])

    def events_after(self, event_id: int) -> list[AnnotationEvent]:
        return [e for e in self.events if e.id > event_id]

    def undoable(self, user: User) -> AnnotationEvent | None:
        """The event ``user`` may undo here: their latest one (an undo too: undoing it re-applies)."""
        return next((e for e in reversed(self.events) if e.user_id == user.id), None)


def taxonomy_state(prediction: Prediction, taxonomy: Taxonomy) -> TaxonomyState:
    result = next((r for r in prediction.results if r.taxonomy_id == taxonomy.id), None)
    events = sorted((e for e in prediction.events if e.taxonomy_id == taxonomy.id), key=lambda e: (e.created_at, e.id))
    return TaxonomyState(taxonomy, result, events, current_labels(result, events))


class ReviewForbidden(CorrectionError):
    """The curator may not do this (undo someone else's event): a 403, not a 400."""


class ReviewConflict(CorrectionError):
    """An accept based on labels that have changed since (a 409): it asserts the whole set the curator saw, so it
    must not count as agreeing with labels they never saw. ``stale``: the taxonomies whose labels changed."""

    def __init__(self, message: str, stale: list[TaxonomyState]) -> None:
        super().__init__(message)
        self.stale = stale


ACTIONS = ("correct", "accept", "skip", "undo", "adjudicate")
# Events that may change the labels: a correction, an adjudication, an undo of either.
CHANGE_KINDS = (*LABEL_KINDS, "undo")
# The actions that send a label set.
LABEL_ACTIONS = ("correct", "adjudicate")


@dataclass
class ReviewPart:
    """What a curator asks for one taxonomy of a prediction.

    ``correct``: ``labels`` is the full new set (plus ``propose``d new labels). ``accept``: the labels are right
    as they stand (with ``labels``, from the page's checkboxes, a changed set is recorded as a correction). ``skip``:
    seen, not decided; it goes to the back of this curator's queue. ``undo``: reverse ``undo_event`` (default: the
    curator's latest event here). ``adjudicate`` (adjudicators and admins): ``labels`` is the final set where
    curators disagreed, replacing the labels now. ``based_on`` is the latest event the curator saw (None: the
    latest now); an accept based on labels that changed since is refused (:class:`ReviewConflict`)."""

    taxonomy: Taxonomy
    action: str = "correct"
    labels: Iterable[object] | None = None
    note: object = ""
    propose: Iterable[object] = ()
    based_on: int | None = None
    undo_event: int | None = None


@dataclass
class Outcome:
    """What one part did: the event recorded (None when nothing changed) and events saved by others meanwhile."""

    state: TaxonomyState
    action: str
    event: AnnotationEvent | None
    concurrent: list[AnnotationEvent] = field(default_factory=list)
    proposals: list[LabelProposal] = field(default_factory=list)


class ReviewCommand:
    """One review of one prediction, over any number of its taxonomies: validated as a whole, then applied as one
    transaction (one event per changed, accepted, skipped or undone taxonomy). The curation page, the annotations
    API and bulk actions all go through it, so their rules cannot drift apart.

    ``validate()`` raises :class:`CorrectionError` (400) or :class:`ReviewForbidden` (403) and commits nothing (the
    caller rolls the session back: new label proposals may have joined it);
    ``run()`` validates, adds the events and commits (``commit=False`` leaves the commit to a caller applying
    several commands in one transaction)."""

    def __init__(self, prediction: Prediction, user: User, parts: Iterable[ReviewPart]) -> None:
        self.prediction = prediction
        self.user = user
        self.parts = list(parts)
        self._outcomes: list[Outcome] | None = None

    def validate(self) -> list[Outcome]:
        """Check every part and plan its event (added to the session only by ``run``)."""
        if self._outcomes is not None:
            return self._outcomes
        if not self.parts:
            raise CorrectionError("nothing to review: name at least one taxonomy")
        slugs = [part.taxonomy.slug for part in self.parts]
        if len(set(slugs)) != len(slugs):
            raise CorrectionError("each taxonomy may appear once in a review")
        for part in self.parts:
            if part.action not in ACTIONS:
                raise CorrectionError(f"action must be one of {', '.join(ACTIONS)}, not {str(part.action)[:40]!r}")
        reviewed = [(part, taxonomy_state(self.prediction, part.taxonomy)) for part in self.parts]
        _refuse_stale_accepts(reviewed)
        outcomes = [getattr(self, f"_plan_{part.action}")(part, state) for part, state in reviewed]
        if not any(o.event or o.proposals or o.concurrent for o in outcomes):
            names = ", ".join(part.taxonomy.name for part in self.parts)
            raise CorrectionError(
                f"nothing to save in {names}: no label changed and there is no note; "
                "press Accept to confirm the labels as they are, or Skip to decide later"
            )
        self._outcomes = outcomes
        return outcomes

    def run(self, commit: bool = True) -> list[Outcome]:
        outcomes = self.validate()
        recorded = [o for o in outcomes if o.event is not None]
        db.session.add_all(o.event for o in recorded)
        db.session.flush()  # ids and times: the order events apply in
        for outcome in recorded:
            state = outcome.state
            state.events.append(outcome.event)
            state.labels = current_labels(state.result, state.events)
            if state.result is not None and any(e.kind in LABEL_KINDS for e in state.events):
                store_current_labels(state.result, state.events)  # what the label filter reads
        if commit:
            db.session.commit()
        return outcomes

    def _event(self, part: ReviewPart, kind: str, **fields: object) -> AnnotationEvent:
        # By id, not through the relationship: a planned event joins prediction.events only once it is stored.
        return AnnotationEvent(
            prediction_id=self.prediction.id, taxonomy_id=part.taxonomy.id, user_id=self.user.id, kind=kind, **fields
        )

    def _plan_correct(self, part: ReviewPart, state: TaxonomyState, accept: bool = False) -> Outcome:
        """The diff against what the curator saw (the state after ``based_on``): changes others made since are
        kept; the event carries only this curator's own changes. No change is an accept when ``accept``."""
        if part.labels is None:
            raise CorrectionError(f"labels are missing for {part.taxonomy.name}: send the full new label set")
        taxonomy = part.taxonomy
        wanted = {check_label(label) for label in part.labels}
        proposed = {check_label(label) for label in part.propose}
        note = check_note(part.note)
        if part.based_on is None:
            seen, concurrent = state.labels, []
        else:
            seen, concurrent = state.labels_after(part.based_on), state.events_after(part.based_on)
        decisions = label_decisions(taxonomy.id)
        proposed = {decisions.get(label) or label for label in proposed}  # an accepted proposal under its final name
        known = set(taxonomy_labels(taxonomy))
        _refuse_unknown(taxonomy, wanted, known | pending_labels(taxonomy) | set(seen) | set(state.labels))
        proposals = _proposals(taxonomy, self.prediction, self.user, proposed - known, known)
        wanted |= proposed
        added = sorted(label for label in wanted - set(seen) if label not in state.labels)
        removed = sorted(label for label in set(seen) - wanted if label in state.labels)
        if added or removed or (note and not accept):
            event = self._event(part, "correction", added=added, removed=removed, note=note)
            return Outcome(state, "correct", event, concurrent, proposals)
        if accept:
            return Outcome(state, "accept", self._event(part, "accepted", note=note), concurrent, proposals)
        return Outcome(state, "correct", None, concurrent, proposals)

    def _plan_accept(self, part: ReviewPart, state: TaxonomyState) -> Outcome:
        if part.labels is not None:  # the page: the ticked boxes, which may differ from the labels now
            return self._plan_correct(part, state, accept=True)
        self._no_labels(part)
        return Outcome(state, "accept", self._event(part, "accepted", note=check_note(part.note)))

    def _plan_skip(self, part: ReviewPart, state: TaxonomyState) -> Outcome:
        self._no_labels(part)
        return Outcome(state, "skip", self._event(part, "skipped", note=check_note(part.note)))

    def _plan_undo(self, part: ReviewPart, state: TaxonomyState) -> Outcome:
        self._no_labels(part)
        latest = state.undoable(self.user)
        if part.undo_event is None:
            target = latest
            if target is None:
                raise CorrectionError(f"you have nothing to undo in {part.taxonomy.name}")
        else:
            target = next((e for e in state.events if e.id == part.undo_event), None)
            if target is None:
                raise CorrectionError(
                    f"event {part.undo_event} is not an event of this prediction in {part.taxonomy.name}"
                )
            if target.user_id != self.user.id:
                raise ReviewForbidden(f"event {target.id} is {target.user.name}'s; curators undo only their own events")
            if target is not latest:
                raise CorrectionError(
                    f"event {target.id} is not your latest in {part.taxonomy.name} (that is {latest.id}); "
                    "undo your events newest first"
                )
        return Outcome(state, "undo", self._event(part, "undo", undoes_id=target.id, note=check_note(part.note)))

    def _plan_adjudicate(self, part: ReviewPart, state: TaxonomyState) -> Outcome:
        """The final label set, recorded whole (not as a difference): it stands whatever the reviewers said."""
        if ROLE_RANK.get(self.user.role, 0) < ROLE_RANK["adjudicator"]:
            raise ReviewForbidden("resolving a disagreement needs the adjudicator role")
        if part.labels is None:
            raise CorrectionError(f"labels are missing for {part.taxonomy.name}: send the final label set")
        if any(True for _ in part.propose):
            raise CorrectionError("an adjudication chooses among known labels; propose new labels with a correction")
        final = {check_label(label) for label in part.labels}
        # What a correction may use: the resolve form offers every label a reviewer gave, proposals pending included.
        _refuse_unknown(
            part.taxonomy,
            final,
            set(taxonomy_labels(part.taxonomy)) | pending_labels(part.taxonomy) | set(state.labels),
        )
        event = self._event(part, "adjudicated", added=sorted(final), removed=[], note=check_note(part.note))
        return Outcome(state, "adjudicate", event)

    @staticmethod
    def _no_labels(part: ReviewPart) -> None:
        if part.labels is not None or any(True for _ in part.propose):
            raise CorrectionError(f'"labels" and "propose" go with the action "correct", not "{part.action}"')


def _refuse_unknown(taxonomy: Taxonomy, labels: set[str], allowed: set[str]) -> None:
    """Refuse ``labels`` not in ``allowed``, with what a label change renamed one to or how the taxonomy spells it,
    so a curator can fix the name rather than guess."""
    unknown = sorted(labels - allowed)
    if not unknown:
        return
    hints = []
    for label in unknown:
        renamed = label_map(taxonomy.id).vocabulary([label])
        spelt = same_label(label, sorted(allowed))
        if renamed != [label]:
            hints.append(f"; {label} is now {' or '.join(renamed)}")
        elif spelt is not None:
            hints.append(f"; {label} is spelt {spelt}")
    raise CorrectionError(
        f"not labels of {taxonomy.name} ({taxonomy.slug}): {', '.join(unknown)}{''.join(hints)}; "
        "check the spelling or propose them as new labels"
    )


def _refuse_respelling(name: str, labels: Iterable[str], what: str, advice: str) -> None:
    """Refuse ``name`` when it is one of ``labels`` spelt another way: the history's label filter reads case and
    separators as one label, and training would get both. ``advice`` names the label as ``{label}``."""
    existing = same_label(name, sorted(labels))
    if existing is not None and existing != name:
        raise CorrectionError(
            f"{name!r} is {existing!r} spelt another way (case, spaces, hyphens and underscores do not count), "
            f"{what}; {advice.format(label=repr(existing))}"
        )


def _refuse_stale_accepts(reviewed: list[tuple[ReviewPart, TaxonomyState]]) -> None:
    """Raise :class:`ReviewConflict` naming every taxonomy an accept was sent for whose labels changed since the
    page it was based on (a correction is a difference and merges with others' changes; an accept cannot)."""
    stale = [
        (state, part.based_on)
        for part, state in reviewed
        if part.action == "accept"
        and part.based_on is not None
        and set(state.labels_after(part.based_on)) != set(state.labels)
    ]
    if not stale:
        return
    changes = []
    for state, based_on in stale:
        names = sorted({e.user.name for e in state.events_after(based_on) if e.kind in CHANGE_KINDS})
        now = ", ".join(state.labels) or "none"
        changes.append(f"{' and '.join(names)} changed the labels of {state.taxonomy.name} to {now}")
    raise ReviewConflict(
        f"Not accepted, nothing was saved: while you were reviewing, {'; '.join(changes)}. An accept confirms the "
        "labels you saw; check the labels as they are now and accept again.",
        [state for state, _ in stale],
    )


def describe(event: AnnotationEvent) -> str:
    """An event in words, for flash messages and the pages' event lists."""
    if event.kind == "accepted":
        return "accepted the labels" + (" with a note" if event.note else "")
    if event.kind == "skipped":
        return "skipped"
    if event.kind == "undo":
        return f"undid event {event.undoes_id}"
    if event.kind == "adjudicated":
        return "adjudicated the labels: " + (", ".join(event.added) or "none")
    parts = []
    if event.added:
        parts.append("added " + ", ".join(event.added))
    if event.removed:
        parts.append("removed " + ", ".join(event.removed))
    if event.note:
        parts.append("a note")
    return "; ".join(parts) or "no change"


def _proposals(
    taxonomy: Taxonomy, prediction: Prediction, user: User, labels: set[str], known: set[str]
) -> list[LabelProposal]:
    """One proposal per new label and taxonomy (a second curator proposing it reuses the first's); never a label of
    the taxonomy (``known``) or an earlier proposal spelt another way."""
    if not labels:
        return []
    earlier = {
        proposal.label: proposal
        for proposal in db.session.scalars(select(LabelProposal).where(LabelProposal.taxonomy_id == taxonomy.id))
    }
    rejected = [label for label, proposal in earlier.items() if proposal.status == "rejected"]
    pending = [label for label, proposal in earlier.items() if proposal.status == "proposed"]
    out = []
    for label in sorted(labels):
        _refuse_respelling(label, known, f"a label of {taxonomy.name}", "add {label} instead of proposing it")
        refused = same_label(label, rejected)
        if refused is not None:
            before = "" if refused == label else f" as {refused!r}"
            raise CorrectionError(f"the label {label!r} was proposed before{before} and rejected by an admin")
        _refuse_respelling(
            label, pending, f"a label proposed for {taxonomy.name}", "add {label}: an admin decides on it"
        )
        proposal = earlier.get(label)
        if proposal is None:
            proposal = LabelProposal(taxonomy=taxonomy, label=label, prediction_id=prediction.id, proposed_by=user)
            db.session.add(proposal)
        out.append(proposal)
    return out


def decide_proposal(proposal: LabelProposal, admin: User, accept: bool, final_label: object = None) -> None:
    """Accept (under ``final_label`` when given: a rename) or reject a proposal; decisions are final. Every caller
    goes through the rule that an accepted name is not an existing label spelt another way."""
    if proposal.status != "proposed":
        raise CorrectionError(f"the proposal {proposal.label!r} was already {proposal.status}")
    if accept:
        name = check_label(final_label) if final_label else proposal.label
        what = f"a label of {proposal.taxonomy.name}"
        _refuse_respelling(
            name, taxonomy_labels(proposal.taxonomy), what, "accept it as {label} or choose another name"
        )
        proposal.final_label = name
    proposal.status = "accepted" if accept else "rejected"
    proposal.decided_by = admin
    proposal.decided_at = utcnow()
    db.session.commit()
