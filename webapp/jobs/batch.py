"""CSV batch jobs: upload a CSV of abstracts, tag it in the background, download the result as CSV.

The upload is read and checked in the request (so every problem with the file is a form error), then stored
row by row in the database with its chunks (``BATCH_CHUNK_SIZE`` taggable rows each), one task per chunk queued on
the job engine (``engine``): every worker process, on this machine or another, takes chunks of it. A chunk
is claimed like any job (a conditional UPDATE, then held by its worker), and its predictions, its rows' links and
the batch's counters commit in one transaction only while its worker still holds it, so a chunk whose worker died
is redone by another and no row is ever tagged twice. The batch goes running when its first chunk is claimed,
fails at once with the first chunk that fails, and finishes when its last chunk ends (decided in SQL, so of two
workers ending the last chunks at once exactly one marks it).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from flask import Blueprint, abort, current_app, flash, jsonify, redirect, render_template, request, url_for
from flask import Response as FlaskResponse
from flask_login import current_user
from flask_wtf import FlaskForm
from flask_wtf.file import FileAllowed, FileField, FileRequired
from sqlalchemy import case, exists, func, select, update
from sqlalchemy.orm import selectinload
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import secure_filename
from werkzeug.wrappers import Response

from ..access.auth import has_role, role_required
from ..csv_cells import csv_lines
from ..curation.annotations import label_map, mapped_result
from ..extensions import db
from ..models import BatchChunk, BatchJob, BatchRow, ModelVersion, Prediction, PredictionResult, utcnow
from ..serving.scoring import InputError, NoModelError, Submission, check_submission, predict_and_store
from . import engine

log = logging.getLogger(__name__)
bp = Blueprint("batch", __name__, url_prefix="/batches")
EXTENSION_KEY = engine.EXTENSION_KEY  # the app's job engine

# What a misnamed upload really is, by its first bytes, so the error can say what to do instead.
SIGNATURES = {
    b"PK\x03\x04": "a ZIP archive (an Excel .xlsx workbook?)",
    b"\xd0\xcf\x11\xe0": "an old Excel .xls workbook",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
    b"\x89PNG": "a PNG image",
}
SAVE_AS_CSV = 'save it from your spreadsheet as "CSV UTF-8" and upload that'
# Every row is stored with all the header's columns (the results file gives them back): a header of 40,000 empty
# columns over 200 rows, a 70 KB file, stored 46 MB. Reference-manager exports have 10 to 70 columns.
MAX_COLUMNS = 200
SNIFF_CHARS = 2048


class CsvError(ValueError):
    """The uploaded file cannot become a batch; the message says what is wrong and where."""


@dataclass
class ParsedCsv:
    columns: list[str]
    title_column: int | None
    abstract_column: int
    # (row number as a spreadsheet shows it, cells, reason it is skipped or None)
    rows: list[tuple[int, list[str], str | None]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(1 for _, _, reason in self.rows if reason)


def decode_upload(raw: bytes) -> str:
    """UTF-8 text of the upload, or a :class:`CsvError` naming what the file is or its first bad line."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # the byte-order mark Excel writes
    if not raw.strip():
        raise CsvError("the file is empty")
    for signature, kind in SIGNATURES.items():
        if raw.startswith(signature):
            raise CsvError(f"this is not a CSV file but {kind}; {SAVE_AS_CSV}")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CsvError(f"the file is UTF-16 text; {SAVE_AS_CSV}")
    if b"\x00" in raw:
        raise CsvError(f"the file contains NUL bytes, so it is a binary file rather than a text CSV; {SAVE_AS_CSV}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise CsvError(
            f"line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at character {column}); {SAVE_AS_CSV}"
        ) from exc


def _find_columns(header: list[str]) -> tuple[int | None, int]:
    names = [name.strip().lower() for name in header]
    for wanted in ("title", "abstract"):
        if names.count(wanted) > 1:
            raise CsvError(f"{names.count(wanted)} columns are named {wanted!r}; keep one")
    if "abstract" not in names:
        found = ", ".join(repr(name) for name in header) or "none"
        raise CsvError(f"no 'abstract' column; the columns found are: {found}")
    return (names.index("title") if "title" in names else None), names.index("abstract")


def parse_csv(text: str, max_rows: int) -> ParsedCsv:
    """Header and rows of a CSV; rows that cannot be tagged carry their reason instead of failing the file."""
    # Only the separator is guessed, from the header's start (Excel writes ";" in some locales; the sniffer's time
    # grows with the square of its sample: 14 s for a 40 KB line); quoting is standard.
    sample = text.split("\n", 1)[0][:SNIFF_CHARS]
    try:
        delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t").delimiter
    except csv.Error:  # one column, or nothing to tell the separators apart
        delimiter = ","
    reader = csv.reader(io.StringIO(text, newline=""), csv.excel, delimiter=delimiter)
    try:
        header = next(reader)
        if len(header) > MAX_COLUMNS:
            raise CsvError(
                f"the header has {len(header):,} columns; at most {MAX_COLUMNS} are kept with each row, so save the "
                "file with fewer (the title, the abstract and those you want back)"
            )
        title_column, abstract_column = _find_columns(header)
        parsed = ParsedCsv(list(header), title_column, abstract_column)
        # Spreadsheet numbering: the header is row 1, and a cell with line breaks is still one row.
        for row_number, cells in enumerate(reader, start=2):
            if not any(cell.strip() for cell in cells):
                continue
            parsed.rows.append((row_number, *_check_row(cells, parsed)))
    except csv.Error as exc:
        raise CsvError(f"line {reader.line_num} cannot be read as CSV: {exc}") from exc
    if not parsed.rows:
        raise CsvError("the file has a header but no rows below it")
    if len(parsed.rows) > max_rows:
        raise CsvError(f"the file has {len(parsed.rows):,} rows; at most {max_rows:,} fit in one batch, so split it")
    if parsed.skipped == len(parsed.rows):
        first = "; ".join(f"row {number}: {reason}" for number, _, reason in parsed.rows[:3])
        raise CsvError(f"none of the {len(parsed.rows):,} rows can be tagged ({first})")
    return parsed


def _check_row(cells: list[str], parsed: ParsedCsv) -> tuple[list[str], str | None]:
    width = len(parsed.columns)
    if len(cells) > width and any(cell.strip() for cell in cells[width:]):
        return cells[:width], f"it has {len(cells)} cells but the header has {width} columns"
    cells = cells[:width] + [""] * (width - len(cells))
    try:
        row_submission(cells, parsed.title_column, parsed.abstract_column)
    except InputError as exc:
        return cells, str(exc)
    return cells, None


def row_submission(cells: list[str], title_column: int | None, abstract_column: int) -> Submission:
    title = cells[title_column] if title_column is not None else None
    return check_submission(title, cells[abstract_column])


def create_job(filename: str, parsed: ParsedCsv, created_by: str | None) -> BatchJob:
    """Store the job, all its rows and its chunks in one commit; :func:`queue_job` hands the chunks to the workers."""
    skipped = parsed.skipped
    job = BatchJob(
        filename=filename,
        created_by=created_by,
        columns=parsed.columns,
        title_column=parsed.title_column,
        abstract_column=parsed.abstract_column,
        total_rows=len(parsed.rows),
        processed=skipped,
        skipped=skipped,
    )
    db.session.add(job)
    db.session.flush()
    db.session.add_all(
        BatchRow(job_id=job.id, row_number=number, cells=cells, skip_reason=reason)
        for number, cells, reason in parsed.rows
    )
    taggable = [number for number, _, reason in parsed.rows if reason is None]
    size = int(current_app.config["BATCH_CHUNK_SIZE"])
    db.session.add_all(
        BatchChunk(job_id=job.id, first_row=taggable[at], last_row=taggable[min(at + size, len(taggable)) - 1])
        for at in range(0, len(taggable), size)
    )
    db.session.commit()
    return job


def queue_job(job_id: int) -> int:
    """Queue a task for each of the job's chunks not yet taken (what the upload does once the job is stored);
    how many were queued."""
    chunks = db.session.scalars(
        select(BatchChunk.id).where(BatchChunk.job_id == job_id, BatchChunk.status == "queued").order_by(BatchChunk.id)
    ).all()
    return engine.enqueue(BATCH_CHUNKS, *chunks)


# --- the background work (run by worker processes of the job engine, webapp/jobs/engine.py) ---------------------

OPEN = ("queued", "running")


def process_chunk(chunk_id: int, worker: str) -> None:
    """Tag one chunk, which this worker holds (the job engine claimed it): its rows' predictions, their links and
    the batch's counters commit together, then the batch ends if this was its last open chunk. A failure fails the
    chunk and, at once, its batch (with the reason), whose chunks not yet taken are not run."""
    chunk = db.session.get(BatchChunk, chunk_id)
    assert chunk is not None
    job_id, first_row, last_row = chunk.job_id, chunk.first_row, chunk.last_row
    job = db.session.get(BatchJob, job_id)
    assert job is not None
    columns = (job.title_column, job.abstract_column)
    if job.status == "failed":  # the chunk was held by a worker that died, and meanwhile another chunk failed
        _fail(chunk_id, job_id, worker, f"not run: batch job {job_id} had failed")
        return
    if job.status == "queued":
        db.session.execute(
            update(BatchJob)
            .where(BatchJob.id == job_id, BatchJob.status == "queued")
            .values(status="running", started_at=func.coalesce(BatchJob.started_at, utcnow()), heartbeat_at=utcnow())
        )
        db.session.commit()
    try:
        rows = db.session.scalars(
            select(BatchRow)
            .where(
                BatchRow.job_id == job_id,
                BatchRow.row_number.between(first_row, last_row),
                BatchRow.prediction_id.is_(None),
                BatchRow.skip_reason.is_(None),
            )
            .order_by(BatchRow.row_number)
        ).all()
        if not _tag_chunk(chunk_id, job_id, worker, rows, *columns):
            log.warning(
                "chunk %d of batch job %d was taken over by another worker; %s drops it", chunk_id, job_id, worker
            )
            return
    except NoModelError as exc:
        db.session.rollback()
        _fail(chunk_id, job_id, worker, str(exc))
        return
    except Exception as exc:
        db.session.rollback()
        log.exception("chunk %d of batch job %d failed", chunk_id, job_id)
        _fail(chunk_id, job_id, worker, f"{exc.__class__.__name__}: {exc}")
        return
    settle_batches(job_id)


def _tag_chunk(
    chunk_id: int, job_id: int, worker: str, rows: list[BatchRow], title_column: int | None, abstract_column: int
) -> bool:
    """Predict the chunk's rows and commit them with the batch's counters, only while this worker still holds the
    chunk and only onto rows no one linked meanwhile; False (nothing committed) otherwise."""
    valid: list[tuple[BatchRow, Submission]] = []
    skipped = 0
    for row in rows:
        try:  # checked at upload too; checked again in case the limits changed meanwhile
            valid.append((row, row_submission(row.cells, title_column, abstract_column)))
        except InputError as exc:
            row.skip_reason = str(exc)
            skipped += 1
    submissions = [submission for _, submission in valid]
    predictions = predict_and_store(submissions, source="batch", batch_id=job_id, commit=False) if valid else []
    if valid:
        links = {row.id: prediction.id for (row, _), prediction in zip(valid, predictions, strict=True)}
        linked = db.session.execute(
            update(BatchRow)
            .where(BatchRow.id.in_(links), BatchRow.prediction_id.is_(None))
            .values(prediction_id=case(links, value=BatchRow.id))
            .execution_options(synchronize_session=False)
        ).rowcount
        if linked != len(links):
            db.session.rollback()
            log.error(
                "chunk %d of batch job %d: %d of its rows were already tagged", chunk_id, job_id, len(links) - linked
            )
            return False
    if not engine.finish(BatchChunk, chunk_id, worker, status="finished", commit=False):
        db.session.rollback()
        return False
    db.session.execute(
        update(BatchJob)
        .where(BatchJob.id == job_id)
        .values(
            processed=BatchJob.processed + len(rows),
            skipped=BatchJob.skipped + skipped,
            worker=worker,
            heartbeat_at=utcnow(),
        )
    )
    db.session.commit()
    return True


def _fail(chunk_id: int, job_id: int, worker: str, error: str) -> None:
    """Fail the chunk this worker holds and, unless it has ended, its batch with the same reason; the batch's
    chunks not yet taken are failed too (not run). Nothing when another worker took the chunk over."""
    if not engine.finish(BatchChunk, chunk_id, worker, status="failed", error=error, commit=False):
        db.session.rollback()
        return
    now = utcnow()
    db.session.execute(
        update(BatchJob)
        .where(BatchJob.id == job_id, BatchJob.status.in_(OPEN))
        .values(status="failed", error=error, finished_at=now, heartbeat_at=now)
    )
    db.session.execute(
        update(BatchChunk)
        .where(BatchChunk.job_id == job_id, BatchChunk.status == "queued")
        .values(status="failed", error=f"not run: chunk {chunk_id} failed", finished_at=now)
    )
    db.session.commit()


def settle_batches(job_id: int | None = None) -> int:
    """Mark finished the open batch ``job_id`` (by default every open batch) once none of its chunks is open, and
    commit; how many. Run by the worker that ended a chunk, after its commit (whichever of two workers ending the
    last chunks at once runs this later sees both ended; the UPDATE's condition lets one of them mark it), and by
    every sweep, for a batch whose last chunk's worker died in between (or that has no chunk to run)."""
    open_chunks = exists().where(BatchChunk.job_id == BatchJob.id, BatchChunk.status.in_(OPEN))
    ending = update(BatchJob).where(BatchJob.status.in_(OPEN), ~open_chunks)
    if job_id is not None:
        still_open = exists().where(BatchChunk.job_id == job_id, BatchChunk.status.in_(OPEN))
        if db.session.scalar(select(still_open)):  # a read first: most chunks are not the last
            db.session.rollback()
            return 0
        ending = ending.where(BatchJob.id == job_id)
    now = utcnow()
    ended = db.session.execute(ending.values(status="finished", finished_at=now, heartbeat_at=now)).rowcount
    db.session.commit()
    return ended


BATCH_CHUNKS = engine.JobKind("batch-chunk", BatchChunk, process_chunk, settle=settle_batches)


@bp.record_once
def _attach_worker(state: Any) -> None:
    engine.register(state.app, BATCH_CHUNKS)


# --- the result CSV ------------------------------------------------------------------------------------------


def _result_taxonomies(job_id: int) -> dict[str, list[str]]:
    """``{slug: labels}`` of every taxonomy that answered for the job (labels of all versions used, in order)."""
    used = db.session.execute(
        select(ModelVersion)
        .where(
            ModelVersion.id.in_(
                select(PredictionResult.model_version_id)
                .join(Prediction, Prediction.id == PredictionResult.prediction_id)
                .where(Prediction.batch_id == job_id)
            )
        )
        .options(selectinload(ModelVersion.taxonomy))
        .order_by(ModelVersion.created_at)
    ).scalars()
    labels: dict[str, dict[str, None]] = {}
    taxonomy_ids: dict[str, int] = {}
    for version in used:
        labels.setdefault(version.taxonomy.slug, {}).update(dict.fromkeys(version.labels))
        taxonomy_ids[version.taxonomy.slug] = version.taxonomy_id
    # In today's names (label surgery), like the result pages.
    return {slug: label_map(taxonomy_ids[slug]).vocabulary(labels[slug]) for slug in sorted(labels)}


def _unique(name: str, taken: set[str]) -> str:
    while name in taken:
        name = f"papertag_{name}"
    taken.add(name)
    return name


@dataclass(frozen=True)
class CsvFormat:
    """How a result CSV is written: a UTF-8 byte-order mark first or not, the cell separator, the decimal mark of
    the scores, and what the file name gets."""

    bom: bool
    delimiter: str
    decimal: str
    suffix: str


# The result CSV's ``?format=``. "csv", the default, is plain UTF-8 with commas: what scripts have always read.
# Excel reads a CSV as UTF-8 only after a byte-order mark (else accents come out garbled), and splits it on its
# locale's list separator: "," where the decimal mark is ".", ";" where it is "," (German, French...), and there a
# score of "0.5" is text, not a number. A "sep=;" first line would name the separator whatever the locale, but Excel
# then ignores the byte-order mark, so the locale is chosen on the page instead.
RESULT_FORMATS = {
    "csv": CsvFormat(bom=False, delimiter=",", decimal=".", suffix=""),
    "excel": CsvFormat(bom=True, delimiter=",", decimal=".", suffix="-excel"),
    "excel-semicolon": CsvFormat(bom=True, delimiter=";", decimal=",", suffix="-excel-semicolon"),
}


def result_csv(
    job: BatchJob, with_scores: bool, page_size: int = 500, csv_format: CsvFormat = RESULT_FORMATS["csv"]
) -> Iterator[str]:
    """The job's CSV: the uploaded columns, then ``prediction_id``, one column per taxonomy with its predicted
    labels joined by ``; ``, one ``<taxonomy> best guess`` per taxonomy (``yes`` when no label passed its threshold
    and the labels are the model's best guess), with ``with_scores`` one ``<taxonomy>:<label>`` column per label,
    and ``skipped``; written as ``csv_format`` says.
    Formula-like cells (the uploaded ones above all) are neutralised by :func:`csv_lines`."""
    if csv_format.bom:
        yield "\ufeff"
    yield from csv_lines(_result_rows(job, with_scores, page_size, csv_format.decimal), delimiter=csv_format.delimiter)


def _result_rows(job: BatchJob, with_scores: bool, page_size: int, decimal: str = ".") -> Iterator[list[Any]]:
    """The rows of :func:`result_csv`, read a page of rows at a time."""
    taxonomies = _result_taxonomies(job.id)
    taken = set(job.columns)
    header = list(job.columns) + [_unique("prediction_id", taken)]
    header += [_unique(slug, taken) for slug in taxonomies]
    header += [_unique(f"{slug} best guess", taken) for slug in taxonomies]
    if with_scores:
        header += [_unique(f"{slug}:{label}", taken) for slug, labels in taxonomies.items() for label in labels]
    header.append(_unique("skipped", taken))
    yield header
    after = 0
    while True:
        rows = db.session.scalars(
            select(BatchRow)
            .where(BatchRow.job_id == job.id, BatchRow.row_number > after)
            .order_by(BatchRow.row_number)
            .limit(page_size)
            .options(
                selectinload(BatchRow.prediction)
                .selectinload(Prediction.results)
                .selectinload(PredictionResult.taxonomy)
            )
        ).all()
        if not rows:
            return
        for row in rows:
            stored = {r.taxonomy.slug: r for r in row.prediction.results} if row.prediction else {}
            results = {slug: mapped_result(r) for slug, r in stored.items()}
            out = list(row.cells) + [row.prediction_id or ""]
            out += ["; ".join(results[slug].labels) if slug in results else "" for slug in taxonomies]
            out += ["yes" if slug in stored and stored[slug].best_guess else "" for slug in taxonomies]
            if with_scores:
                for slug, labels in taxonomies.items():
                    scores = results[slug].scores if slug in results else {}
                    out += [f"{scores[label]:.4f}".replace(".", decimal) if label in scores else "" for label in labels]
            out.append(row.skip_reason or "")
            yield out
        after = rows[-1].row_number


# --- views ---------------------------------------------------------------------------------------------------


class UploadForm(FlaskForm):
    file = FileField(
        "CSV file",
        validators=[FileRequired("choose a CSV file"), FileAllowed(["csv", "txt", "tsv"], "upload a .csv file")],
    )


def job_json(job: BatchJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "filename": job.filename,
        "total_rows": job.total_rows,
        "processed": job.processed,
        "skipped": job.skipped,
        "tagged": job.processed - job.skipped,
        "percent": round(100 * job.processed / job.total_rows) if job.total_rows else 100,
        "error": job.error,
        "created_at": job.created_at.isoformat() + "Z",
        "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
    }


def _get_job(job_id: int) -> BatchJob:
    job = db.session.get(BatchJob, job_id)
    if job is None:
        abort(404, description=f"there is no batch job {job_id}")
    return job


def _render_index(form: UploadForm, status: int = 200, error: str | None = None) -> tuple[str, int]:
    query = select(BatchJob).order_by(BatchJob.id.desc()).limit(50)
    if not has_role(current_user, "admin"):  # a batch is its creator's and the admins' (read_access)
        query = query.where(BatchJob.created_by == current_user.name)
    jobs = db.session.scalars(query).all()
    config = current_app.config
    return (
        render_template(
            "batch/index.html",
            form=form,
            jobs=jobs,
            error=error,
            max_rows=config["BATCH_MAX_ROWS"],
            max_mb=config["BATCH_MAX_UPLOAD_BYTES"] // (1024 * 1024),
            max_chars=config["ABSTRACT_MAX_CHARS"],
        ),
        status,
    )


@bp.url_value_preprocessor
def _upload_limit(endpoint: str | None, _values: dict[str, Any] | None) -> None:
    """Allow uploads their own size limit. Set here because this runs before any ``before_request`` hook,
    CSRFProtect's included, and that hook is what first reads the body."""
    if endpoint == "batch.upload":
        request.max_content_length = current_app.config["BATCH_MAX_UPLOAD_BYTES"]


@bp.errorhandler(RequestEntityTooLarge)
def _too_large(_exc: RequestEntityTooLarge) -> tuple[str, int]:
    mb = current_app.config["BATCH_MAX_UPLOAD_BYTES"] // (1024 * 1024)
    return _render_index(UploadForm(formdata=None), 413, error=f"the file is larger than {mb} MB; split it")


@bp.get("")
@role_required("curator")
def index() -> tuple[str, int]:
    return _render_index(UploadForm())


@bp.post("")
@role_required("curator")
def upload() -> Response | tuple[str, int]:
    config = current_app.config
    form = UploadForm()
    if not form.validate():
        return _render_index(form, 400)
    upload_file = form.file.data
    filename = upload_file.filename or "upload.csv"
    try:
        parsed = parse_csv(decode_upload(upload_file.read()), int(config["BATCH_MAX_ROWS"]))
    except CsvError as exc:
        return _render_index(form, 400, error=f"{PurePath(filename).name}: {exc}")
    job = create_job(PurePath(filename).name[:255], parsed, created_by=current_user.name)
    queue_job(job.id)
    flash(f"Batch #{job.id} queued: {job.total_rows:,} rows, {job.skipped:,} of them skipped.", "ok")
    return redirect(url_for("batch.detail", job_id=job.id))


@bp.get("/<int:job_id>")
@role_required("curator")
def detail(job_id: int) -> str:
    job = _get_job(job_id)
    skipped_rows = db.session.scalars(
        select(BatchRow)
        .where(BatchRow.job_id == job.id, BatchRow.skip_reason.is_not(None))
        .order_by(BatchRow.row_number)
        .limit(200)
    ).all()
    return render_template(
        "batch/detail.html", job=job, status=job_json(job), skipped_rows=skipped_rows, waiting=engine.is_waiting(job)
    )


@bp.get("/<int:job_id>/status")
@role_required("curator")
def status(job_id: int) -> FlaskResponse:
    """What the job page polls to move its progress bar."""
    return jsonify(job_json(_get_job(job_id)))


@bp.get("/<int:job_id>/results.csv")
@role_required("curator")
def results(job_id: int) -> FlaskResponse:
    """The result CSV (``?scores=1``: with every label's score; ``?format=``: one of :data:`RESULT_FORMATS`)."""
    chosen = request.args.get("format", "csv")
    csv_format = RESULT_FORMATS.get(chosen)
    if csv_format is None:
        abort(400, description=f"format must be one of {', '.join(RESULT_FORMATS)}, not {chosen[:40]!r}")
    job = _get_job(job_id)
    if job.status != "finished":
        abort(409, description=f"batch job {job.id} is {job.status}; its results can be downloaded once it finishes")
    with_scores = request.args.get("scores") == "1"
    stem = secure_filename(PurePath(job.filename).stem) or "batch"
    name = f"{stem}-tagged{'-scores' if with_scores else ''}{csv_format.suffix}.csv"
    body = list(result_csv(job, with_scores, csv_format=csv_format))
    response = FlaskResponse(body, mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
