"""CSV batch jobs: upload -> background tagging -> result CSV and history; every bad file; resuming a job whose
process died without tagging anything twice; who may use batches."""

from __future__ import annotations

import csv
import html
import io
import time
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from tests.conftest import PASSWORD, add_user, job_engine_of, make_app, signed_in
from webapp.batch import claim_job, create_job, decode_upload, parse_csv, process_job
from webapp.extensions import db
from webapp.models import BatchJob, BatchRow, Prediction, utcnow
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


def wait_for(client: FlaskClient, job_id: int, timeout: float = 120) -> dict:
    """Run the app's queued jobs here, playing its worker process, until the job ended; its final status.
    ``timeout`` only stops a hung test (a busy CI machine is slow, never wrong)."""
    engine = job_engine_of(client.application)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        engine.run_pending()
        status = client.get(f"/batches/{job_id}/status").get_json()
        if status["status"] in ("finished", "failed"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"batch {job_id} did not finish: {status}")


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
    assert result[0] == ["Paper ID", "Title", "ABSTRACT", "Venue", "prediction_id", "test-tasks", "skipped"]
    assert [r[:4] for r in result[1:]] == rows[1:]
    with app.app_context():
        for line in result[1:]:
            prediction = db.session.get(Prediction, int(line[4]))
            assert prediction.batch_id == job_id and prediction.source == "batch"
            assert prediction.abstract == line[2].strip()
            assert line[5] == "; ".join(prediction.results[0].labels)
            assert line[6] == ""

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


def _stored_job(app: Flask, abstracts: list[dict], n: int = 40) -> int:
    rows = [[a["title"], a["abstract"]] for a in (abstracts * 3)[:n]]
    with app.app_context():
        parsed = parse_csv(make_csv([["title", "abstract"], *rows]).decode(), 5000)
        return create_job("stored.csv", parsed, created_by="tests").id


def _counts(app: Flask, job_id: int) -> tuple[int, int, str]:
    with app.app_context():
        predictions = db.session.scalar(select(func.count(Prediction.id)).where(Prediction.batch_id == job_id))
        linked = db.session.scalar(
            select(func.count(BatchRow.id)).where(BatchRow.job_id == job_id, BatchRow.prediction_id.is_not(None))
        )
        return predictions, linked, db.session.get(BatchJob, job_id).status


def test_a_job_left_running_by_a_dead_process_is_resumed_without_duplicates(app: Flask, abstracts: list[dict]) -> None:
    job_id = _stored_job(app, abstracts)
    with app.app_context():
        app.config["BATCH_CHUNK_SIZE"] = 16
        assert claim_job("dead-host:1") == job_id
        # The dead process had committed one chunk of 16 before it died.
        rows = db.session.scalars(select(BatchRow).where(BatchRow.job_id == job_id).order_by(BatchRow.row_number))
        first = list(rows)[:16]
        predictions = predict_and_store(
            [Submission(r.cells[0], r.cells[1]) for r in first], "batch", job_id, commit=False
        )
        for row, prediction in zip(first, predictions, strict=True):
            row.prediction_id = prediction.id
        job = db.session.get(BatchJob, job_id)
        job.processed, job.heartbeat_at = job.processed + 16, utcnow() - timedelta(hours=1)
        db.session.commit()

        assert claim_job("alive:2") == job_id
        assert claim_job("alive:3") is None  # held, with a fresh heartbeat
        process_job(job_id, "alive:2")
        job = db.session.get(BatchJob, job_id)
        assert (job.status, job.processed, job.worker) == ("finished", 40, "alive:2")
    assert _counts(app, job_id) == (40, 40, "finished")


def test_a_worker_that_lost_its_job_commits_nothing(app: Flask, abstracts: list[dict]) -> None:
    job_id = _stored_job(app, abstracts, 10)
    with app.app_context():
        assert claim_job("slow:1") == job_id
        job = db.session.get(BatchJob, job_id)
        job.heartbeat_at = utcnow() - timedelta(hours=1)
        db.session.commit()
        assert claim_job("fast:2") == job_id  # took over the stale job
        process_job(job_id, "slow:1")  # the old holder wakes up: its chunk must not count
        assert _counts(app, job_id) == (0, 0, "running")
        process_job(job_id, "fast:2")
    assert _counts(app, job_id) == (10, 10, "finished")


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
        assert claim_job("w:1") == job_id
        process_job(job_id, "w:1")
        job = db.session.get(BatchJob, job_id)
        assert (job.status, job.processed, job.skipped) == ("finished", 5, 5)
        reasons = db.session.scalars(select(BatchRow.skip_reason).where(BatchRow.job_id == job_id)).all()
        assert all("it must have at most 100" in reason for reason in reasons)
    assert _counts(app, job_id) == (0, 0, "finished")
