"""Safe model actions, replay progress and training phases in a real browser (issue 12 point 7): a candidate that
failed the promotion gate has no primary Activate button and is activated only through a confirmation page whose
checkbox the browser requires; Roll back is confirmed too and the models page is right at once; a replay shows a
progress bar that follows the job until its report appears; a training run's page follows its phases.
Screenshots of the new pages at 1280 and 375 px go to ``docs/screenshots/``."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from tests import test_browser
from tests.test_browser import SCREENSHOTS, SLUG, WAIT_MS, Site, check_layout, predict, sign_in
from webapp.extensions import db
from webapp.jobs import replay as replay_module
from webapp.models import Taxonomy, TrainingRun
from webapp.training_runs import create_run, update_run

# The browser, the served site and the checked page, as tests/test_browser.py sets them up.
browser, site, page = test_browser.browser, test_browser.site, test_browser.page
DOCS = test_browser.REPO_ROOT / "docs" / "screenshots"
FAILED_GATE = {
    "passed": False,
    "reason": "test micro-F1 0.0740 is below the active model's 0.6640",
    "candidate_micro_f1": 0.074,
    "active_micro_f1": 0.664,
    "drift": 0.002,
}


def screenshots(page: Page, name: str, main_action) -> None:  # noqa: ANN001 - a Locator
    """check_layout's screenshots at 1280 and 375 px, kept in docs/screenshots for the README."""
    check_layout(page, name, main_action)
    DOCS.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-375px"):
        shutil.copy(SCREENSHOTS / f"{name}{suffix}.png", DOCS / f"{name}{suffix}.png")


def failed_run(site: Site) -> int:
    """A finished training run whose candidate (the site's inactive version) failed the promotion gate."""
    with site.app.app_context():
        taxonomy = db.session.query(Taxonomy).filter_by(slug=SLUG).one()
        run = TrainingRun(taxonomy=taxonomy, status="finished", candidate_version=site.other, gate=FAILED_GATE)
        db.session.add(run)
        db.session.commit()
        return run.id


def test_a_failed_candidate_is_activated_only_once_confirmed_then_rolled_back(page: Page, site: Site) -> None:
    run_id = failed_run(site)
    sign_in(page, "ada")
    page.goto(f"/training/{run_id}")
    expect(page.locator(".button.primary")).to_have_count(0)  # the gate said no: nothing invites the click
    activate = page.get_by_role("link", name=f"Activate {site.other} anyway…")
    expect(activate).to_have_class("button danger")
    activate.click()

    expect(page.get_by_role("heading", name=f"Activate {site.other}?")).to_be_visible()
    expect(page.locator(".consequence")).to_contain_text("micro-F1 0.074 against the then active model's 0.664")
    submit = page.get_by_role("button", name=f"Activate {site.other}")
    screenshots(page, "model-confirm", submit)
    submit.click()  # unticked: the browser's own check keeps the form from leaving
    assert page.eval_on_selector("input[name=confirm]", "box => box.validity.valueMissing") is True
    assert f"/models/{site.other}/activate" in page.url
    page.get_by_label("I have read what this does and want it done.").check()
    submit.click()
    expect(page.locator(".flash").first).to_contain_text(f"{site.other} is now the active Research tasks model")
    assert page.url.endswith(f"/training/{run_id}")

    page.get_by_role("link", name=f"Roll back {site.other}…").click()
    expect(page.locator(".consequence")).to_contain_text(f"{site.active} becomes the active Research tasks model")
    page.get_by_label("I have read what this does and want it done.").check()
    page.get_by_role("button", name="Roll back Research tasks").click()
    expect(page.locator(".flash").first).to_contain_text(f"Rolled back: {site.active} is the active")
    page.goto("/models")  # right at once: the rolled-back-to version serves here, the other does not
    expect(page.locator("tr.active-row .badge", has_text="serving here")).to_have_text("serving here")
    expect(page.locator("tr", has=page.get_by_text(site.other, exact=True)).get_by_text("serving here")).to_have_count(
        0
    )
    expect(page.get_by_text("still serving here")).to_have_count(0)


@pytest.fixture
def held_replay(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Replays wait at their first chunk until the test lets them go, so the page is seen mid-way."""
    release = threading.Event()
    scored = replay_module.predicted_sets

    def waiting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        release.wait(WAIT_MS / 1000)
        return scored(*args, **kwargs)

    monkeypatch.setattr(replay_module, "predicted_sets", waiting)
    yield release
    release.set()


def test_replay_shows_a_progress_bar_until_its_report_appears(
    page: Page, site: Site, abstracts: list[dict], held_replay: threading.Event
) -> None:
    predict(site, abstracts[:12])
    sign_in(page, "ada")
    page.goto("/models")
    page.locator("tr", has=page.get_by_text(site.other, exact=True)).get_by_role("button", name="Replay").click()
    expect(page.locator(".flash").first).to_contain_text(f"Replay #1 of {site.other} against {site.active}")
    job = page.locator("#replay-job")
    # The page reloads when the job goes from queued to running.
    expect(job.locator("[data-field=status]")).to_have_text("running", timeout=WAIT_MS)
    bar = job.locator("progress")
    expect(bar).to_have_attribute("max", "12")
    expect(bar).to_have_attribute("value", "0")
    expect(page.get_by_role("button", name="Replay")).to_be_disabled()
    screenshots(page, "replay-progress", bar)
    held_replay.set()
    expect(page.get_by_role("heading", name="What would change")).to_be_visible(timeout=WAIT_MS)  # polled, reloaded
    expect(job).to_have_count(0)
    expect(page.locator(".stats div", has_text="Abstracts replayed").locator("dd")).to_have_text("12")


def test_a_training_run_page_follows_its_phases(page: Page, site: Site) -> None:
    with site.app.app_context():
        run_id = create_run(SLUG, {"config": "default"}, requested_by="ada").id
        update_run(run_id, {"phase": "prepare", "stage": "preparing the encoder"})
        update_run(run_id, {"phase": "epoch", "stage": "fine-tuning the encoder", "epoch": 1, "step": 1})
        update_run(run_id, {"total_steps": 300, "loss": 0.69, "eta_seconds": 600})
    sign_in(page, "ada")
    page.goto(f"/training/{run_id}")
    expect(page.locator(".phase.current")).to_have_text("Epochs (current)")
    expect(page.locator(".phase.done")).to_have_text(["Prepare (done)"])
    expect(page.locator("#time-left")).to_be_visible()
    expect(page.locator("#time-left dd")).to_contain_text("min")
    screenshots(page, "training-phases", page.locator(".phases"))

    with site.app.app_context():  # the trainer moves on: the page reloads into the new phase, no stale estimate
        update_run(run_id, {"phase": "export", "stage": "exporting the encoder to ONNX and int8"})
    expect(page.locator(".phase.current")).to_have_text("Export (current)", timeout=WAIT_MS)
    expect(page.locator("#time-left")).to_be_hidden()
    with site.app.app_context():
        update_run(run_id, {"status": "finished", "candidate_version": site.other, "gate": FAILED_GATE})
    expect(page.locator("[data-field=status]")).to_have_text("finished", timeout=WAIT_MS)
    expect(page.locator(".phase.done")).to_have_count(3)  # prepare, epoch, export
    expect(page.locator(".phase.skipped")).to_have_count(3)  # the phases it never reported
    expect(page.locator("#time-left")).to_be_hidden()
