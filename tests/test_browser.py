"""Real-browser tests: Debian's Chromium, driven by Playwright, against the app on a real HTTP server on
127.0.0.1 with CSRF on (as in production). Every page visited is screenshotted into
``test-artifacts/screenshots/`` and checked at phone width: nothing scrolls sideways and its main action is on
screen. A script error or a Content-Security-Policy violation on any page fails the test."""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
from sqlalchemy import select
from werkzeug.serving import WSGIRequestHandler, make_server

from tests.conftest import PASSWORD, BundleFactory, add_user, live_models_of, make_app, running_jobs
from tests.tiny_bundle import LABELS
from webapp.config import REPO_ROOT
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.models import AnnotationEvent, PredictionResult, Taxonomy
from webapp.serving.registry import import_bundle

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
SLUG = "research-tasks"  # the taxonomy trainer/configs/default.json trains, so the Retrain button is offered
# Generous waits for a loaded 2-core CI machine; nothing asserts how fast anything is.
WAIT_MS = 120_000


@dataclass
class Site:
    url: str
    app: Flask
    active: str  # the version active at the start
    other: str  # an imported, inactive version of the same taxonomy


class QuietRequestHandler(WSGIRequestHandler):
    """No access-log line per request: a failing test's captured log shows the app's own messages."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `sh tests/services/chromium.sh` (as root) or `make test`")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def site(tmp_path: Path, make_bundle: BundleFactory) -> Iterator[Site]:
    """The app with two versions of ``research-tasks``, a curator and an admin, served by werkzeug in a thread."""
    app = make_app(tmp_path / "data", WTF_CSRF_ENABLED=True)
    with app.app_context():
        versions = [
            import_bundle(make_bundle(seed=seed, slug=SLUG, name="Research tasks", labels=LABELS), actor="tests")
            for seed in (3, 4)
        ]
        active, other = (result.version.id for result in versions)
    add_user(app, "cora", "curator")
    add_user(app, "ada", "admin")
    with served(app) as url:
        yield Site(url, app, active, other)


@contextmanager
def served(app: Flask) -> Iterator[str]:
    """``app`` on a real HTTP server in a thread, with a thread running its queued jobs as a worker process would,
    at the URL yielded; stopped with its background threads after."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="browser-test-server", daemon=True)
    thread.start()
    try:
        with running_jobs(app):
            yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        live_models_of(app).stop()
        app.extensions[BATCH_WORKER].stop()
        with app.app_context():
            db.engine.dispose()


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    with checked_page(browser, site.url, DESKTOP) as opened:
        yield opened


@contextmanager
def checked_page(browser: Browser, url: str, viewport: dict[str, int]) -> Iterator[Page]:
    """A fresh browser profile; fails the test on any script error or CSP violation (both reach the console)."""
    context = browser.new_context(base_url=url, viewport=viewport, accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    opened.on("pageerror", lambda error: problems.append(str(error)))
    yield opened
    context.close()
    assert not problems, f"the browser reported errors (script or Content-Security-Policy): {problems}"


# The innermost elements reaching past the right edge, as "tag.class" strings: what a layout failure names.
OVERFLOWING = """width => [...document.body.querySelectorAll('*')]
  .filter(el => el.getBoundingClientRect().right > width + 0.5)
  .filter(el => ![...el.children].some(child => child.getBoundingClientRect().right > width + 0.5))
  .slice(0, 8)
  .map(el => el.tagName.toLowerCase() + (typeof el.className === 'string' && el.className ? '.' + el.className : ''))"""


def check_layout(page: Page, name: str, main_action: Locator) -> None:
    """Screenshot the page at desktop and phone width; at 375 px it must not scroll sideways and its main
    action must be on screen."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    expect(main_action).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(PHONE)
    try:
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], (
            f"{name}: the page is {width}px wide at 375px, so it scrolls sideways; "
            f"too wide: {page.evaluate(OVERFLOWING, PHONE['width'])}"
        )
        main_action.scroll_into_view_if_needed()
        expect(main_action).to_be_visible()
        box = main_action.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (
            f"{name}: the main action is off screen at 375px: {box}"
        )
        page.screenshot(path=str(SCREENSHOTS / f"{name}-375px.png"), full_page=True)
    finally:
        page.set_viewport_size(DESKTOP)


def sign_in(page: Page, name: str, next_path: str = "") -> None:
    page.goto(f"/login?next={next_path}" if next_path else "/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".flash").first).to_contain_text(f"Signed in as {name}")


def predict(site: Site, abstracts: list[dict]) -> list[int]:
    """Predictions made through the API (what an earlier visitor would have left in the history)."""
    client = site.app.test_client()
    response = client.post(
        "/api/v1/predict", json={"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts]}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return [p["id"] for p in response.get_json()["predictions"]]


def predicted_labels(site: Site, prediction_id: int) -> list[str]:
    with site.app.app_context():
        result = db.session.scalar(select(PredictionResult).where(PredictionResult.prediction_id == prediction_id))
        return list(result.labels)


def test_submit_an_abstract_and_read_the_result(page: Page, site: Site, abstracts: list[dict]) -> None:
    page.goto("/")
    submit = page.get_by_role("button", name="Tag it")
    check_layout(page, "home", submit)
    expect(page.locator(".version").first).to_have_text(site.active)
    page.fill("#title", abstracts[0]["title"])
    page.fill("#abstract", abstracts[0]["abstract"])
    expect(page.locator("#abstract-count")).to_contain_text(f"{len(abstracts[0]['abstract'].strip())} characters")
    submit.click()
    page.wait_for_url("**/predictions/*?new=1")
    prediction_id = int(page.url.split("/predictions/")[1].split("?")[0])
    expect(page.locator("h1")).to_have_text(abstracts[0]["title"])
    card = page.locator("section.result")
    expect(card.locator(".version")).to_have_text(site.active)
    predicted = card.locator("ul.labels").first.locator(".label-row:not(.missed)")
    names = predicted.locator(".label-name").all_inner_texts()
    assert names == predicted_labels(site, prediction_id), "the page shows other labels than were stored"
    rows = card.locator(".label-row")
    assert rows.count() >= 1, "the result shows no label at all (neither predicted nor near misses)"
    expect(card.locator("svg.bar")).to_have_count(rows.count())
    for score in rows.locator(".label-score").all_inner_texts():
        assert score.endswith("%") and 0 <= float(score[:-1]) <= 100, f"not a probability: {score!r}"
    check_layout(page, "result", page.get_by_role("link", name="Tag another"))


def test_browse_and_filter_the_history(page: Page, site: Site, abstracts: list[dict]) -> None:
    ids = predict(site, abstracts[:6])
    page.goto("/history")
    check_layout(page, "history", page.get_by_role("button", name="Filter"))
    expect(page.locator(".history-item")).to_have_count(6)
    # Newest first: the last one stored is on top.
    expect(page.locator(".history-item .history-title").first).to_have_text(abstracts[5]["title"])

    page.fill("input[name=q]", abstracts[2]["title"])
    page.get_by_role("button", name="Filter").click()
    expect(page.locator(".history-item")).to_have_count(1)
    expect(page.locator(".history-title")).to_have_text(abstracts[2]["title"])

    page.get_by_role("link", name="Clear").click()
    label = next(label for i in ids for label in predicted_labels(site, i))
    expected = sum(label in predicted_labels(site, i) for i in ids)
    page.fill("input[name=label]", label)
    page.select_option("select[name=reviewed]", "no")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator(".history-item")).to_have_count(expected)
    for chips in page.locator(".history-item .chips").all():
        expect(chips).to_contain_text(label)
    page.locator(".history-title").first.click()
    expect(page.locator("section.result")).to_be_visible()


def test_curator_corrects_a_prediction_with_the_label_search(page: Page, site: Site, abstracts: list[dict]) -> None:
    (prediction_id,) = predict(site, abstracts[3:4])
    page.goto(f"/login?next=/curate/predictions/{prediction_id}")
    check_layout(page, "login", page.get_by_role("button", name="Sign in"))
    sign_in(page, "cora", f"/curate/predictions/{prediction_id}")
    page.wait_for_url(f"**/curate/predictions/{prediction_id}")
    before = predicted_labels(site, prediction_id)
    section = page.locator(f"#tax-{SLUG}")
    ticked = section.locator(f"input[name='{SLUG}-labels']:checked")
    removed = ticked.first.get_attribute("value") if ticked.count() else None
    if removed:
        section.locator(f"input[name='{SLUG}-labels'][value='{removed}']").uncheck()
    candidates = [label for label in LABELS if label not in before and label != removed]
    added, also = candidates[0], candidates[1]

    search = section.locator(f"#add-{SLUG}")
    # The box searches the taxonomy's labels as one types: it is tied to a list holding every label.
    options = search.evaluate("input => [...input.list.options].map(option => option.value)")
    assert sorted(options) == sorted(LABELS), "the label search does not offer the taxonomy's labels"
    search.press_sequentially(added.lower()[:4])
    search.press_sequentially(added.lower()[4:])
    search.press("Enter")  # a typed label, in any case, is taken on Enter
    picked = section.locator("[data-picked] li")
    expect(picked).to_have_count(1)
    expect(picked.first).to_contain_text(added)
    expect(search).to_have_value("")
    search.fill("not a label at all")
    search.press("Enter")
    expect(picked).to_have_count(1)
    assert "Not a label" in search.evaluate("input => input.validationMessage")
    # Choosing from the suggestions is an input event that is not typing (what Chromium sends for a datalist).
    search.evaluate(
        "(input, label) => { input.value = label;"
        " input.dispatchEvent(new InputEvent('input', {inputType: 'insertReplacementText'})); }",
        also,
    )
    expect(picked).to_have_count(2)
    section.get_by_role("button", name=f"Remove {also}").click()
    expect(picked).to_have_count(1)
    section.locator(f"#note-{SLUG}").fill("checked against the paper")
    check_layout(page, "correct", section.get_by_role("button", name="Save", exact=True))
    section.get_by_role("button", name="Save", exact=True).click()

    expect(page.locator(".flash").first).to_contain_text(f"Saved Research tasks: added {added}")
    current = page.locator(f"#tax-{SLUG} .inline-chips .chip").all_inner_texts()
    assert added in current and also not in current and (removed is None or removed not in current), current
    with site.app.app_context():
        event = db.session.scalar(select(AnnotationEvent).where(AnnotationEvent.prediction_id == prediction_id))
        assert event.added == [added] and event.removed == ([removed] if removed else [])
        assert event.note == "checked against the paper"
    assert predicted_labels(site, prediction_id) == before, "the original prediction was overwritten"


def test_walk_the_review_queue_with_save_and_next(page: Page, site: Site, abstracts: list[dict]) -> None:
    predict(site, abstracts[:4])
    sign_in(page, "cora")
    page.wait_for_url("**/curate/queue")
    start = page.get_by_role("link", name="Start reviewing")
    check_layout(page, "queue", start)
    expect(page.get_by_text("4 to review")).to_be_visible()
    order = [int(text.split(" ")[0][1:]) for text in page.locator(".history-item .meta").all_inner_texts()]
    start.click()
    visited = []
    for _ in range(3):
        page.wait_for_url("**/curate/predictions/*queue=1*")
        visited.append(int(page.url.split("/curate/predictions/")[1].split("?")[0]))
        box = page.locator(f"#tax-{SLUG} input[name='{SLUG}-labels']").first
        box.set_checked(not box.is_checked())  # a change, so the item counts as reviewed
        if len(visited) == 1:
            check_layout(page, "queue-item", page.get_by_role("button", name="Save and next"))
        page.get_by_role("button", name="Save and next").click()
        expect(page.locator(".flash").first).to_contain_text("Saved Research tasks")
    assert visited == order[:3], "Save and next did not follow the queue's order (most uncertain first)"
    page.goto("/curate/queue")
    expect(page.get_by_text("1 to review")).to_be_visible()


def test_upload_a_csv_and_download_the_results(page: Page, site: Site, abstracts: list[dict]) -> None:
    rows = [{"ref": f"r{i}", "Title": a["title"], "Abstract": a["abstract"]} for i, a in enumerate(abstracts[:5])]
    rows[1]["Title"] = 'A title, with "quotes"; and a semicolon'
    upload = io.StringIO()
    writer = csv.DictWriter(upload, fieldnames=["ref", "Title", "Abstract"])
    writer.writeheader()
    writer.writerows(rows)
    sign_in(page, "cora")
    page.goto("/batches")
    check_layout(page, "batches", page.get_by_role("button", name="Upload and tag"))
    page.set_input_files(
        "#file", files=[{"name": "papers.csv", "mimeType": "text/csv", "buffer": upload.getvalue().encode()}]
    )
    page.get_by_role("button", name="Upload and tag").click()
    expect(page.locator(".flash").first).to_contain_text("queued: 5 rows")
    download_link = page.get_by_role("link", name="Download CSV")
    expect(download_link).to_be_visible()  # the page polls its status and reloads when the job is done
    check_layout(page, "batch-done", download_link)

    with page.expect_download() as plain:
        download_link.click()
    assert plain.value.suggested_filename == "papers-tagged.csv"
    result = list(csv.DictReader(io.StringIO(Path(plain.value.path()).read_text(encoding="utf-8"))))
    assert [row["ref"] for row in result] == [row["ref"] for row in rows]
    assert result[1]["Title"] == rows[1]["Title"]
    for row in result:
        assert row["skipped"] == "" and row["prediction_id"], row
        assert row[SLUG] == "; ".join(predicted_labels(site, int(row["prediction_id"])))
    with page.expect_download() as scored:
        page.get_by_role("link", name="CSV with scores").click()
    header = Path(scored.value.path()).read_text(encoding="utf-8").splitlines()[0].split(",")
    assert [f"{SLUG}:{label}" for label in LABELS] == [column for column in header if column.startswith(f"{SLUG}:")]
    page.get_by_label("CSV for Excel").select_option("excel-semicolon")
    page.get_by_label("Columns").select_option("1")
    with page.expect_download() as excel:
        page.get_by_role("button", name="Download for Excel").click()
    assert excel.value.suggested_filename == "papers-tagged-scores-excel-semicolon.csv"
    raw = Path(excel.value.path()).read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and raw[3:].decode("utf-8").splitlines()[0].split(";") == header
    page.get_by_role("link", name="See them in the history").click()
    expect(page.locator(".history-item")).to_have_count(5)


def active_version(site: Site) -> str | None:
    with site.app.app_context():
        return db.session.scalar(select(Taxonomy.active_version_id).where(Taxonomy.slug == SLUG))


def wait_until_served(site: Site, version: str) -> None:
    """Wait for the server's watcher to swap to ``version`` (no bound here: pytest-timeout stops a hung test). A
    version that failed to load fails at once, naming the error."""
    live = live_models_of(site.app)
    while live.loaded().get(SLUG) != version:
        assert version not in live.errors, f"{version} could not be loaded: {live.errors[version]}"
        time.sleep(0.1)


def test_admin_retrains_then_activates_and_rolls_back(page: Page, site: Site, abstracts: list[dict]) -> None:
    sign_in(page, "ada")
    page.goto("/training")
    retrain = page.get_by_role("button", name="Retrain")
    check_layout(page, "training", retrain)
    retrain.click()
    expect(page.locator(".flash").first).to_contain_text("queued with the 'default' config")
    expect(page.locator("h1")).to_have_text("Retraining Research tasks")
    check_layout(page, "training-run", page.locator("h1"))

    page.goto("/models")
    other_row = page.locator("tr", has=page.get_by_text(site.other, exact=True))
    activate = other_row.get_by_role("button", name="Activate")
    check_layout(page, "models", activate)
    activate.click()
    expect(page.locator(".flash").first).to_contain_text(f"{site.other} is now the active Research tasks model")
    expect(page.locator("tr.active-row .version")).to_have_text(site.other)
    assert active_version(site) == site.other
    page.goto("/")  # the first page that predicts starts this server's model watcher
    wait_until_served(site, site.other)
    page.reload()
    expect(page.locator("aside .version")).to_have_text(site.other)

    page.goto("/models")
    page.get_by_role("link", name=f"Roll back {site.other}…").click()  # a rollback is confirmed first
    page.get_by_label("I have read what this does and want it done.").check()
    page.get_by_role("button", name="Roll back Research tasks").click()
    expect(page.locator(".flash").first).to_contain_text(f"Rolled back: {site.active} is the active")
    expect(page.locator("tr.active-row .version")).to_have_text(site.active)
    assert active_version(site) == site.active
    wait_until_served(site, site.active)
