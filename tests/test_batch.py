"""CSV batch jobs: upload -> background tagging -> result CSV and history; every bad file; a batch cut into
chunks that workers share, a chunk whose process died redone without tagging anything twice, the batch's status
and counters exact whoever ends its chunks; who may use batches."""

from __future__ import annotations

import codecs
import csv
import html
import io
import time
from datetime import timedelta
from pathlib import Path

import flask_migrate
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update

from tests.conftest import PASSWORD, BundleFactory, add_user, job_engine_of, live_models_of, make_app, signed_in
from webapp.extensions import db
from webapp.jobs import batch
from webapp.jobs import engine as jobs
from webapp.jobs.batch import BATCH_CHUNKS, create_job, decode_upload, parse_csv, process_chunk, queue_job
from webapp.models import BatchChunk, BatchJob, BatchRow, Prediction, utcnow
from webapp.serving.registry import import_bundle
from webapp.serving.scoring import Submission, predict_and_store


def make_csv(rows: list[list[str]], delimiter: str = ",") -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter).writerows(rows)
    return buffer.getvalue().encode("utf-8")


def paper_rows(abstracts: list[dict], n: int = 10) -> list[list[str]]:
    """Mixed-case title/abstract headers and two extra columns that must come back untouched."""
    rows = [["Paper ID", "Title", "ABSTRACT", "Venue"]]
    rows += [[row["id"], row["title"], row["abstract"], f"venue {i}"] for i, row in enumerate(abstracts[:n])]
    return rows


def upload(client: FlaskClient, content: bytes, name: str = "papers.csv"):  # noqa: ANN201 - test helper
    return client.post("/batches", data={"file": (io.BytesIO(content), name)}, content_type="multipart/form-data")


def wait_for(client: FlaskClient, job_id: int) -> dict:
    """Run the app's queued jobs here, playing its worker process, until the job ended; its final status."""
    engine = job_engine_of(client.application)
    while True:
        engine.run_pending()
        status = client.get(f"/batches/{job_id}/status").get_json()
        if status["status"] in ("finished", "failed"):
            return status
        time.sleep(0.1)


def job_id_of(response) -> int:  # noqa: ANN001 - test helper
    assert response.status_code == 302, response.get_data(as_text=True)
    return int(response.headers["Location"].rstrip("/").rsplit("/", 1)[1])


def job_count(app: Flask) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count(BatchJob.id)))


def test_upload_tags_every_row_and_returns_the_extra_columns(
    app: Flask, curator_client: FlaskClient, abstracts: list[dict]
) -> None:
    rows = paper_rows(abstracts)
    job_id = job_id_of(upload(curator_client, make_csv(rows)))
    status = wait_for(curator_client, job_id)
    assert status | {"created_at": None, "finished_at": None} == {
        "id": job_id,
        "status": "finished",
        "filename": "papers.csv",
        "total_rows": 10,
        "processed": 10,
        "skipped": 0,
        "tagged": 10,
        "percent": 100,
        "error": None,
        "created_at": None,
        "finished_at": None,
    }

    page = curator_client.get(f"/batches/{job_id}").get_data(as_text=True)
    assert f"/batches/{job_id}/results.csv" in page and f"/history?batch={job_id}" in page
    assert 'max="10" value="10"' in page

    response = curator_client.get(f"/batches/{job_id}/results.csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert 'filename="papers-tagged.csv"' in response.headers["Content-Disposition"]
    result = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert result[0] == [
        "Paper ID", "Title", "ABSTRACT", "Venue", "prediction_id", "test-tasks", "test-tasks best guess", "skipped"
    ]  # fmt: skip
    assert [r[:4] for r in result[1:]] == rows[1:]
    with app.app_context():
        for line in result[1:]:
            prediction = db.session.get(Prediction, int(line[4]))
            assert prediction.batch_id == job_id and prediction.source == "batch"
            assert prediction.abstract == line[2].strip()
            assert line[5] == "; ".join(prediction.results[0].labels)
            assert line[6] == ("yes" if prediction.results[0].best_guess else "")
            assert line[7] == ""

    scored = curator_client.get(f"/batches/{job_id}/results.csv?scores=1")
    table = list(csv.reader(io.StringIO(scored.get_data(as_text=True))))
    score_columns = [name for name in table[0] if name.startswith("test-tasks:")]
    assert len(score_columns) == 8 and "test-tasks:Object Detection" in score_columns
    first = dict(zip(table[0], table[1], strict=True))
    assert all(0.0 <= float(first[name]) <= 1.0 for name in score_columns)

    history = curator_client.get(f"/history?batch={job_id}").get_data(as_text=True)
    assert "10 predictions" in history and f"batch #{job_id}" in history
    assert abstracts[0]["title"] in history
    predict_and_store_elsewhere(app)
    assert "10 predictions" in curator_client.get(f"/history?batch={job_id}").get_data(as_text=True)
    assert curator_client.get("/history?batch=abc").status_code == 400


def test_the_result_csv_for_excel_has_a_byte_order_mark_and_the_locales_separator(
    app: Flask, curator_client: FlaskClient, abstracts: list[dict]
) -> None:
    rows = paper_rows(abstracts, 3)
    rows[1][1] = "Über naïve Ärzte; «tags», 東京"
    job_id = job_id_of(upload(curator_client, make_csv(rows)))
    assert wait_for(curator_client, job_id)["status"] == "finished"
    page = curator_client.get(f"/batches/{job_id}").get_data(as_text=True)
    assert '<option value="excel">' in page and '<option value="excel-semicolon">' in page

    def download(query: str) -> bytes:
        response = curator_client.get(f"/batches/{job_id}/results.csv?scores=1{query}")
        assert response.status_code == 200 and response.mimetype == "text/csv"
        return response.data

    # The default is plain UTF-8 with commas, as before: what csv.writer writes of its own table (CRLF), no BOM.
    plain = download("")
    table = list(csv.reader(io.StringIO(plain.decode("utf-8"))))
    assert plain == make_csv(table) == download("&format=csv")
    assert table[1][1] == rows[1][1] and not plain.startswith(codecs.BOM_UTF8)
    # Excel, commas: the same file after a byte-order mark (Excel then reads it as UTF-8).
    excel = curator_client.get(f"/batches/{job_id}/results.csv?scores=1&format=excel")
    assert excel.data == codecs.BOM_UTF8 + plain
    assert 'filename="papers-tagged-scores-excel.csv"' in excel.headers["Content-Disposition"]
    # Excel, semicolons: cells between ";" (quoted where they hold one) and scores with a decimal comma.
    semicolons = download("&format=excel-semicolon")
    assert semicolons.startswith(codecs.BOM_UTF8) and '"Über naïve Ärzte; «tags», 東京"'.encode() in semicolons
    split = list(csv.reader(io.StringIO(semicolons.decode("utf-8-sig")), delimiter=";"))
    scores = [j for j, name in enumerate(table[0]) if name.startswith("test-tasks:")]
    assert scores and all("," in split[1][j] and "." not in split[1][j] for j in scores)
    assert [[cell.replace(",", ".") if j in scores else cell for j, cell in enumerate(row)] for row in split] == table
    # What the site writes for Excel it reads back.
    with app.app_context():
        assert parse_csv(decode_upload(semicolons), 10).columns == table[0]

    for query, value in (("format=xlsx", "'xlsx'"), ("format=", "''"), ("format=EXCEL", "'EXCEL'")):
        refused = curator_client.get(f"/batches/{job_id}/results.csv?{query}")
        assert refused.status_code == 400
        assert f"format must be one of csv, excel, excel-semicolon, not {value}" in html.unescape(
            refused.get_data(as_text=True)
        )


def predict_and_store_elsewhere(app: Flask) -> None:
    """A prediction that is not part of the batch, so the history filter has something to leave out."""
    with app.app_context():
        predict_and_store([Submission("Other", "An abstract that is not part of any batch at all.")], "api")


def test_semicolons_short_rows_and_a_title_less_file_are_read(
    app: Flask, curator_client: FlaskClient, abstracts: list[dict]
) -> None:
    text = make_csv([["abstract", "note"], [abstracts[0]["abstract"]], [abstracts[1]["abstract"], "x"]], ";")
    job_id = job_id_of(upload(curator_client, text))
    assert wait_for(curator_client, job_id)["tagged"] == 2
    result = list(csv.reader(io.StringIO(curator_client.get(f"/batches/{job_id}/results.csv").get_data(as_text=True))))
    assert result[0][:2] == ["abstract", "note"] and result[1][1] == "" and result[2][1] == "x"


def test_a_row_over_the_length_limit_is_skipped_and_reported(
    app: Flask, curator_client: FlaskClient, abstracts: list[dict]
) -> None:
    rows = paper_rows(abstracts, 3)
    rows[2][2] = "word " * 5000  # spreadsheet row 3: 25,000 characters
    rows.append(["x", "too many cells", abstracts[5]["abstract"], "venue", "surprise"])  # row 5
    job_id = job_id_of(upload(curator_client, make_csv(rows)))
    status = wait_for(curator_client, job_id)
    assert (status["status"], status["total_rows"], status["tagged"], status["skipped"]) == ("finished", 4, 2, 2)
    page = curator_client.get(f"/batches/{job_id}").get_data(as_text=True)
    assert "<td>3</td>" in page and "it must have at most 20000" in page
    assert "<td>5</td>" in page and "it has 5 cells but the header has 4 columns" in page
    result = list(csv.reader(io.StringIO(curator_client.get(f"/batches/{job_id}/results.csv").get_data(as_text=True))))
    assert len(result) == 5
    assert result[2][4] == "" and "at most 20000" in result[2][-1]
    assert result[1][4] and result[3][4] and result[1][-1] == result[3][-1] == ""


BAD_FILES = {
    "not-utf8": (
        b"title,abstract\nfine,An abstract that is long enough to tag.\nbad,Caf\xe9 abstract in Latin-1 text.\n",
        "line 3 is not UTF-8 text (byte 0xe9",
    ),
    "no-abstract-column": (
        b"Title,Summary,Year\na,b,c\n",
        "no 'abstract' column; the columns found are: 'Title', 'Summary', 'Year'",
    ),
    "empty": (b"", "the file is empty"),
    "blank": (b"\n\n  \n", "the file is empty"),
    "byte-order-mark-only": (b"\xef\xbb\xbf", "the file is empty"),
    "too-many-columns": (
        ("abstract" + ",'" * 20_000 + "\nAn abstract long enough to tag, about object detection.\n").encode(),
        "the header has 20,001 columns; at most 200",
    ),
    "header-only": (b"title,abstract\n", "the file has a header but no rows below it"),
    "png-renamed": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "not a CSV file but a PNG image"),
    "xlsx-renamed": (b"PK\x03\x04\x14\x00\x06\x00" + bytes(200), "a ZIP archive (an Excel .xlsx workbook?)"),
    "binary": (bytes(range(256)) * 4, "contains NUL bytes"),
    "utf16": ("title,abstract\n".encode("utf-16"), "UTF-16"),
    "two-abstracts": (b"abstract,Abstract\na,b\n", "2 columns are named 'abstract'"),
    "nothing-taggable": (b"title,abstract\na,too short\n", "none of the 1 rows can be tagged (row 2: abstract is 9"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_form_errors(app: Flask, curator_client: FlaskClient, case: str) -> None:
    content, message = BAD_FILES[case]
    response = upload(curator_client, content)
    page = html.unescape(response.get_data(as_text=True))
    assert response.status_code == 400, page
    assert message in page
    assert job_count(app) == 0


def test_over_5000_rows_is_refused(app: Flask, curator_client: FlaskClient) -> None:
    rows = [["title", "abstract"]] + [[f"p{i}", f"Abstract number {i} about object detection."] for i in range(5001)]
    response = upload(curator_client, make_csv(rows))
    assert response.status_code == 400
    assert "the file has 5,001 rows; at most 5,000 fit in one batch" in response.get_data(as_text=True)
    assert job_count(app) == 0


def test_missing_file_wrong_type_and_too_large(tmp_path: Path, make_bundle) -> None:  # noqa: ANN001
    app = make_app(tmp_path / "data", BATCH_MAX_UPLOAD_BYTES=1024 * 1024)
    try:
        client = signed_in(app, "cora", "curator")
        none = client.post("/batches", data={}, content_type="multipart/form-data")
        assert none.status_code == 400 and "choose a CSV file" in none.get_data(as_text=True)
        xlsx = upload(client, b"PK\x03\x04", name="sheet.xlsx")
        assert xlsx.status_code == 400 and "upload a .csv file" in xlsx.get_data(as_text=True)
        big = upload(client, b"title,abstract\n" + b"x" * (1024 * 1024 + 10))
        assert big.status_code == 413 and "larger than 1 MB" in big.get_data(as_text=True)
        assert job_count(app) == 0
    finally:
        app.extensions["papertag.batch_worker"].stop()


def test_decode_reports_the_first_bad_line_and_keeps_a_bom_out() -> None:
    assert decode_upload(b"\xef\xbb\xbftitle,abstract\n") == "title,abstract\n"
    with pytest.raises(ValueError, match=r"line 2 is not UTF-8 text \(byte 0xff at character 4\)"):
        decode_upload(b"ok\nabc\xffdef\n\xff\n")


def test_the_separator_is_guessed_from_the_header_start(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    """csv.Sniffer's time grows with the square of its sample (14 s for a 40 KB header): it reads the first
    ``SNIFF_CHARS`` characters, which still tell ";" from ","."""
    samples: list[str] = []
    sniff = csv.Sniffer.sniff
    monkeypatch.setattr(
        csv.Sniffer, "sniff", lambda self, sample, **kw: samples.append(sample) or sniff(self, sample, **kw)
    )
    header = ["title", "abstract", *(f"a long column name: number {n} of the export" for n in range(150))]
    text = make_csv([header, ["A title", "An abstract long enough to tag, about object detection."]], ";").decode()
    with app.app_context():
        parsed = parse_csv(text, 10)
    assert [len(sample) for sample in samples] == [batch.SNIFF_CHARS] < [len(text.split("\n")[0])]
    assert parsed.columns == header and parsed.rows[0][2] is None


def test_a_row_wider_than_the_header_is_skipped_and_kept_to_its_columns(app: Flask) -> None:
    rows = [
        ["title", "abstract"],
        ["A title", "An abstract long enough to tag, about object detection."],
        ["Wide", "Another abstract long enough to tag, about parsing.", *"xyz" * 100],
    ]
    with app.app_context():
        _, (number, cells, reason) = parse_csv(make_csv(rows).decode(), 10).rows
    assert (number, reason) == (3, "it has 302 cells but the header has 2 columns") and cells == rows[2][:2]


def _stored_job(app: Flask, abstracts: list[dict], n: int = 40, chunk: int = 16) -> int:
    """A batch of ``n`` rows stored as the upload stores it, in chunks of ``chunk`` rows, with no task queued."""
    rows = [[a["title"], a["abstract"]] for a in (abstracts * 3)[:n]]
    with app.app_context():
        app.config["BATCH_CHUNK_SIZE"] = chunk
        parsed = parse_csv(make_csv([["title", "abstract"], *rows]).decode(), 5000)
        return create_job("stored.csv", parsed, created_by="tests").id


def _counts(app: Flask, job_id: int) -> tuple[int, int, str]:
    with app.app_context():
        predictions = db.session.scalar(select(func.count(Prediction.id)).where(Prediction.batch_id == job_id))
        linked = db.session.scalar(
            select(func.count(BatchRow.id)).where(BatchRow.job_id == job_id, BatchRow.prediction_id.is_not(None))
        )
        return predictions, linked, db.session.get(BatchJob, job_id).status


def _job(app: Flask, job_id: int) -> BatchJob:
    with app.app_context():
        job = db.session.get(BatchJob, job_id)
        db.session.expunge(job)
        return job


def _chunks(app: Flask, job_id: int) -> list[tuple[int, int, str, str | None]]:
    """(first row, last row, status, worker) of the job's chunks, in order."""
    with app.app_context():
        query = select(BatchChunk.first_row, BatchChunk.last_row, BatchChunk.status, BatchChunk.worker)
        return [tuple(row) for row in db.session.execute(query.where(BatchChunk.job_id == job_id).order_by("id"))]


def _claim(worker: str) -> int | None:
    """What a worker's task does first: take the oldest claimable chunk."""
    return jobs.claim(BATCH_CHUNKS, worker)


def _stale(chunk_id: int) -> None:
    """The chunk's holder went quiet (its process died) long ago."""
    chunk = db.session.get(BatchChunk, chunk_id)
    chunk.heartbeat_at = utcnow() - timedelta(hours=1)
    db.session.commit()


def test_a_batch_is_cut_into_chunks_of_its_taggable_rows(app: Flask, abstracts: list[dict]) -> None:
    rows = [[a["title"], a["abstract"]] for a in abstracts[:9]]
    rows[3][1] = "too short"  # spreadsheet row 5: skipped at upload, so in no chunk
    with app.app_context():
        app.config["BATCH_CHUNK_SIZE"] = 3
        job_id = create_job("c.csv", parse_csv(make_csv([["title", "abstract"], *rows]).decode(), 50), "tests").id
    assert _chunks(app, job_id) == [(2, 4, "queued", None), (6, 8, "queued", None), (9, 10, "queued", None)]
    assert (_job(app, job_id).processed, _job(app, job_id).skipped) == (1, 1)


def test_workers_share_a_batch_chunk_by_chunk_and_its_status_moves_once(app: Flask, abstracts: list[dict]) -> None:
    job_id = _stored_job(app, abstracts, 10, chunk=4)
    assert _job(app, job_id).status == "queued"
    with app.app_context():
        first, second, third = _claim("a:1"), _claim("b:1"), _claim("a:2")
        assert _claim("b:2") is None, "three chunks, three claims"
        assert _job(app, job_id).status == "queued", "claiming alone starts nothing the page shows"
        process_chunk(second, "b:1")
        job = _job(app, job_id)
        assert (job.status, job.processed, job.worker) == ("running", 4, "b:1") and job.started_at
        process_chunk(first, "a:1")
        assert (_job(app, job_id).status, _job(app, job_id).processed) == ("running", 8)
        process_chunk(third, "a:2")
    job = _job(app, job_id)
    assert (job.status, job.processed, job.skipped, job.error) == ("finished", 10, 0, None)
    assert job.started_at <= job.finished_at
    assert [(status, worker) for *_, status, worker in _chunks(app, job_id)] == [
        ("finished", "a:1"),
        ("finished", "b:1"),
        ("finished", "a:2"),
    ]
    assert _counts(app, job_id) == (10, 10, "finished")


def test_a_chunk_left_running_by_a_dead_process_is_redone_without_duplicates(app: Flask, abstracts: list[dict]) -> None:
    job_id = _stored_job(app, abstracts, 40, chunk=16)
    with app.app_context():
        done = _claim("dead-host:1")
        process_chunk(done, "dead-host:1")  # the dead process had committed one chunk of 16
        held = _claim("dead-host:1")  # and died holding the next one
        last = _claim("alive:2")
        assert last not in (None, done, held)
        assert _claim("alive:3") is None, "the dead process's chunk is held while its heartbeat is fresh"
        _stale(held)
        assert _claim("alive:3") == held
        process_chunk(held, "alive:3")
        assert _job(app, job_id).status == "running", "a chunk is still held by alive:2"
    assert _counts(app, job_id)[:2] == (32, 32)
    with app.app_context():
        process_chunk(last, "alive:2")
    assert _job(app, job_id).processed == 40
    assert _counts(app, job_id) == (40, 40, "finished")


def test_a_worker_that_lost_its_chunk_commits_nothing(app: Flask, abstracts: list[dict]) -> None:
    job_id = _stored_job(app, abstracts, 10)
    with app.app_context():
        chunk = _claim("slow:1")
        _stale(chunk)
        assert _claim("fast:2") == chunk  # took over the stale chunk
        process_chunk(chunk, "slow:1")  # the old holder wakes up: its chunk must not count
        assert _counts(app, job_id) == (0, 0, "running")
        assert _job(app, job_id).processed == 0
        process_chunk(chunk, "fast:2")
    assert _counts(app, job_id) == (10, 10, "finished")


def test_a_row_linked_while_its_chunk_was_tagged_is_never_linked_twice(
    app: Flask, abstracts: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever holds the chunk, a row linked to a prediction meanwhile keeps it: the chunk commits nothing."""
    job_id = _stored_job(app, abstracts, 4)

    def racing(submissions: list[Submission], **kwargs: object) -> list[Prediction]:
        predictions = predict_and_store(submissions, **kwargs)
        first = select(func.min(BatchRow.id)).where(BatchRow.job_id == job_id).scalar_subquery()
        db.session.execute(update(BatchRow).where(BatchRow.id == first).values(prediction_id=predictions[0].id))
        return predictions

    monkeypatch.setattr(batch, "predict_and_store", racing)
    with app.app_context():
        chunk = _claim("w:1")
        process_chunk(chunk, "w:1")
        assert db.session.get(BatchChunk, chunk).status == "running", "nothing committed; redone once stale"
    assert _counts(app, job_id) == (0, 0, "running")
    assert _job(app, job_id).processed == 0


def test_the_batch_ends_once_whoever_ends_its_last_chunk(
    app: Flask, abstracts: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies between committing the last chunk and ending the batch leaves it to the sweep, which
    ends it once; two settles at once cannot both mark it (the UPDATE is conditional)."""
    job_id = _stored_job(app, abstracts, 8, chunk=4)
    with monkeypatch.context() as patch:
        patch.setattr(batch, "settle_batches", lambda job_id=None: 0)  # dies before ending the batch
        with app.app_context():
            for worker in ("a:1", "b:1"):
                process_chunk(_claim(worker), worker)
    job = _job(app, job_id)
    assert (job.status, job.processed, job.finished_at) == ("running", 8, None)
    assert all(status == "finished" for *_, status, _ in _chunks(app, job_id))
    engine = job_engine_of(app)
    assert engine.sweep() == 0  # nothing to queue: it only ends the batch
    assert _job(app, job_id).status == "finished"
    with app.app_context():
        assert batch.settle_batches(job_id) == 0 and batch.settle_batches() == 0, "ended once"


def test_the_sweep_queues_queued_chunks_again_only_once_the_queue_is_empty(app: Flask, abstracts: list[dict]) -> None:
    """A big batch's chunks wait in the queue longer than a pending mark lives: while the queue holds tasks, theirs
    are presumed among them (queueing them again would only add tasks that find them taken); a lost queue is empty."""
    job_id = _stored_job(app, abstracts, 8, chunk=4)
    with app.app_context():
        assert queue_job(job_id) == 2
    engine = job_engine_of(app)
    app.config["BATCH_STALE_SECONDS"] = 0  # every pending mark has expired
    assert engine.sweep() == 0
    engine.huey.flush()  # the queue is lost
    assert engine.sweep() == 2
    assert engine.run_pending() == 2
    assert _counts(app, job_id) == (8, 8, "finished")


def test_a_failing_chunk_fails_the_batch_at_once_and_its_other_chunks_are_not_run(
    app: Flask, abstracts: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _stored_job(app, abstracts, 16, chunk=4)
    with app.app_context():
        first, broken, held = _claim("a:1"), _claim("a:2"), _claim("dead:1")
        process_chunk(first, "a:1")
        with monkeypatch.context() as patch:
            patch.setattr(batch, "predict_and_store", lambda *a, **k: 1 / 0)
            process_chunk(broken, "a:2")
        job = _job(app, job_id)
        assert (job.status, job.processed, job.error) == ("failed", 4, "ZeroDivisionError: division by zero")
        assert _claim("b:1") is None, "the chunk not yet taken is not run"
        _stale(held)
        assert _claim("b:1") == held
        process_chunk(held, "b:1")  # a dead worker's chunk, taken over after the batch failed
    assert _counts(app, job_id) == (4, 4, "failed")
    assert [(status, worker) for *_, status, worker in _chunks(app, job_id)] == [
        ("finished", "a:1"),
        ("failed", "a:2"),
        ("failed", "b:1"),
        ("failed", None),
    ]
    with app.app_context():
        errors = db.session.scalars(select(BatchChunk.error).where(BatchChunk.job_id == job_id).order_by("id")).all()
    assert errors[1:] == [
        "ZeroDivisionError: division by zero",
        f"not run: batch job {job_id} had failed",
        f"not run: chunk {broken} failed",
    ]
    assert (_job(app, job_id).status, _job(app, job_id).error) == ("failed", "ZeroDivisionError: division by zero")


def test_a_stopping_worker_hands_its_chunks_back_and_claims_no_more(app: Flask, abstracts: list[dict]) -> None:
    job_id = _stored_job(app, abstracts, 8, chunk=4)
    with app.app_context():
        _claim(f"{jobs.process_prefix()}1")
        _claim("other-host:1:1")
    engine = job_engine_of(app)
    assert engine.release(jobs.process_prefix()) == 1
    released = [("queued", None), ("running", "other-host:1:1")]
    assert [(status, worker) for *_, status, worker in _chunks(app, job_id)] == released
    # Its consumer thread, not stopped yet, takes the chunk's task: the task goes back to the queue, unclaimed.
    with app.app_context():
        assert queue_job(job_id) == 1
    engine.huey.execute(engine.huey.dequeue())
    assert [(status, worker) for *_, status, worker in _chunks(app, job_id)] == released
    assert engine.huey.pending_count() == 1


def test_a_job_without_an_active_model_fails_visibly(
    empty_app: Flask,
    make_bundle,
    abstracts: list[dict],  # noqa: ANN001
) -> None:
    client = signed_in(empty_app, "cora", "curator")
    job_id = job_id_of(upload(client, make_csv(paper_rows(abstracts, 2))))
    status = wait_for(client, job_id)
    assert status["status"] == "failed" and "no model is active" in status["error"]
    assert "no model is active" in client.get(f"/batches/{job_id}").get_data(as_text=True)
    assert client.get(f"/batches/{job_id}/results.csv").status_code == 409
    with empty_app.app_context():
        import_bundle(make_bundle(seed=1))


def test_batches_need_a_signed_in_curator(app: Flask, abstracts: list[dict]) -> None:
    anonymous = app.test_client()
    for response in (
        anonymous.get("/batches"),
        upload(anonymous, make_csv(paper_rows(abstracts, 2))),
        anonymous.get("/batches/1"),
        anonymous.get("/batches/1/status"),
        anonymous.get("/batches/1/results.csv"),
    ):
        assert response.status_code == 302 and "/login" in response.headers["Location"]
    assert job_count(app) == 0
    admin = signed_in(app, "ada", "admin")
    assert admin.get("/batches").status_code == 200
    assert admin.get("/batches/999").status_code == 404


def test_upload_needs_a_csrf_token_and_may_exceed_the_general_request_limit(
    tmp_path: Path, abstracts: list[dict], make_bundle
) -> None:  # noqa: ANN001
    app = make_app(tmp_path / "data", WTF_CSRF_ENABLED=True)
    try:
        with app.app_context():
            import_bundle(make_bundle(seed=1))
        add_user(app, "cora", "curator")
        client = app.test_client()
        login_page = client.get("/login").get_data(as_text=True)
        token = login_page.split('name="csrf_token" type="hidden" value="')[1].split('"')[0]
        client.post("/login", data={"name": "cora", "password": PASSWORD, "csrf_token": token})
        response = upload(client, make_csv(paper_rows(abstracts, 2)))
        assert response.status_code == 400 and "CSRF token is missing" in response.get_data(as_text=True)
        assert job_count(app) == 0
        # With the token, a file over the app-wide 2 MB request limit is still accepted: the batch limit applies
        # before CSRFProtect reads the body.
        page = client.get("/batches").get_data(as_text=True)
        csrf_token = page.split('name="csrf_token" type="hidden" value="')[1].split('"')[0]
        rows = paper_rows(abstracts, 20)
        rows = [rows[0] + ["notes"]] + [row + ["n" * 120_000] for row in rows[1:]]
        content = make_csv(rows)
        assert len(content) > app.config["MAX_CONTENT_LENGTH"]
        response = client.post(
            "/batches",
            data={"file": (io.BytesIO(content), "big.csv"), "csrf_token": csrf_token},
            content_type="multipart/form-data",
        )
        job_id = job_id_of(response)
        status = wait_for(client, job_id)
        assert status["tagged"] == 20, status
    finally:
        app.extensions["papertag.batch_worker"].stop()


def test_rows_that_break_limits_changed_after_upload_are_skipped_while_processing(
    app: Flask, abstracts: list[dict]
) -> None:
    job_id = _stored_job(app, abstracts, 5)
    with app.app_context():
        app.config["ABSTRACT_MAX_CHARS"] = 100
        assert queue_job(job_id) == 1
    assert job_engine_of(app).run_pending() == 1
    with app.app_context():
        job = db.session.get(BatchJob, job_id)
        assert (job.status, job.processed, job.skipped) == ("finished", 5, 5)
        reasons = db.session.scalars(select(BatchRow.skip_reason).where(BatchRow.job_id == job_id)).all()
        assert all("it must have at most 100" in reason for reason in reasons)
    assert _counts(app, job_id) == (0, 0, "finished")


def test_0014_gives_the_open_batches_chunks_of_their_rows_not_yet_tagged(
    tmp_path: Path, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    """A database of the release before: a queued batch, one running with some rows tagged (its worker still
    holds it), a finished one, and one running whose rows were all handled. After the upgrade the open batches'
    untagged rows are chunks, and the workers finish every batch with each row tagged once."""
    app = make_app(tmp_path / "data")
    try:
        with app.app_context():
            import_bundle(make_bundle(seed=1), actor="tests")
        rows = [[a["title"], a["abstract"]] for a in (abstracts * 3)[:40]]
        rows[5][1] = "too short"  # skipped at upload
        running, finished, handled = (_stored_job(app, abstracts, 40, chunk=8) for _ in range(3))
        with app.app_context():
            queued = create_job("q.csv", parse_csv(make_csv([["title", "abstract"], *rows]).decode(), 50), "t").id
            assert queue_job(finished) + queue_job(handled) == 10
        assert job_engine_of(app).run_pending() == 10
        with app.app_context():
            for _ in range(2):  # two chunks of the running batch tagged before the upgrade
                process_chunk(_claim("old-host:1:1"), "old-host:1:1")
            flask_migrate.downgrade(revision="0013_vector_index")
            db.session.execute(
                update(BatchJob)
                .where(BatchJob.id.in_([running, handled]))
                .values(status="running", worker="old-host:1:1", finished_at=None)
            )
            db.session.commit()
            flask_migrate.upgrade()
        assert _chunks(app, queued) == [(2, 34, "queued", None), (35, 41, "queued", None)]  # 32 rows, then 7
        assert _chunks(app, running) == [(18, 41, "queued", None)]
        assert _chunks(app, finished) == _chunks(app, handled) == []
        assert _job(app, running).worker is None, "a worker of the release before loses its batch"
        assert (_job(app, running).processed, _job(app, handled).status) == (16, "running")

        assert job_engine_of(app).sweep() == 3
        assert _job(app, handled).status == "finished"
        assert job_engine_of(app).run_pending() == 3
        for job_id, tagged in ((queued, 39), (running, 40), (finished, 40), (handled, 40)):
            job = _job(app, job_id)
            assert (job.status, job.processed, job.processed - job.skipped) == ("finished", 40, tagged)
            assert _counts(app, job_id) == (tagged, tagged, "finished")
    finally:
        live_models_of(app).stop()
        job_engine_of(app).stop()
        with app.app_context():
            db.engine.dispose()
