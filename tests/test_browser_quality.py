"""Live quality and thresholds that learn in a real browser (the fixtures and checks of tests/test_browser.py):
an admin opens the quality page from the models page, sees the flagged label and both SVG charts, learns
thresholds from the reviews and activates the result. Also writes the README screenshot (JPEG, 1100 px)."""

from __future__ import annotations

from datetime import timedelta

from playwright.sync_api import Page, expect
from sqlalchemy import select

from tests.conftest import BundleFactory
from tests.test_browser import SCREENSHOTS, SLUG, Site, browser, check_layout, page, predict, sign_in, site
from tests.test_quality import OFFLINE, api_token, correct
from tests.tiny_bundle import LABELS
from webapp.extensions import db
from webapp.models import AnnotationEvent, PredictionResult
from webapp.serving.registry import activate, import_bundle

__all__ = ["browser", "page", "site"]  # fixtures used by name
README_WIDTH = {"width": 1100, "height": 900}


def review(site: Site, make_bundle: BundleFactory, abstracts: list[dict]) -> str:
    """A version with per-label test figures, 20 reviewed predictions of it over five weeks: one label removed
    everywhere (it is flagged), another added from a score of 0.3 (its threshold can learn). Returns the
    dropped label."""
    site.app.config.update(QUALITY_MIN_EVIDENCE=3, THRESHOLD_MIN_EVIDENCE=3)
    with site.app.app_context():
        bundle = make_bundle(seed=3, slug=SLUG, name="Research tasks", labels=LABELS, metrics=OFFLINE)
        activate(import_bundle(bundle, actor="tests").version.id, actor="tests")
    ids = predict(site, abstracts)
    client = site.app.test_client()
    curator = api_token(site.app, "reviewer", "curator")
    with site.app.app_context():
        results = {r.prediction_id: r for r in db.session.scalars(select(PredictionResult))}
        db.session.expunge_all()
    counts = {label: sum(label in results[i].labels for i in ids) for label in LABELS}
    dropped = max(LABELS, key=lambda label: counts[label])

    # The tiny models' scores differ from run to run (their tokenizer does): add the label with the most scores just
    # under its threshold, so that reviews which add it move its threshold down.
    def just_under(label: str) -> int:
        return sum(0.3 <= results[i].scores[label] < results[i].thresholds[label] for i in ids)

    added = max((label for label in LABELS if label != dropped), key=just_under)
    assert just_under(added) >= 3, "no label scores between 0.3 and its threshold often enough to learn from"
    for prediction_id in ids:
        result = results[prediction_id]
        gold = (set(result.labels) - {dropped}) | ({added} if result.scores[added] >= 0.3 else set())
        correct(client, curator, prediction_id, gold, note="reviewed", slug=SLUG)
    with site.app.app_context():  # as if reviewed over five weeks
        for i, event in enumerate(db.session.scalars(select(AnnotationEvent).order_by(AnnotationEvent.id))):
            event.created_at -= timedelta(days=35 - i * 35 // len(ids))
        db.session.commit()
    return dropped


def test_admin_reads_live_quality_and_learns_thresholds(
    page: Page, site: Site, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    dropped = review(site, make_bundle, abstracts)
    sign_in(page, "ada")
    page.goto("/models")
    page.get_by_role("link", name="Live quality").click()
    expect(page.locator("h1")).to_have_text("Live quality: Research tasks")
    expect(page.locator(".chips .chip", has_text=f"{dropped}: 0.000 live vs 0.900")).to_have_count(1)
    for chart in page.locator("img.chart").all():
        chart.scroll_into_view_if_needed()
        expect(chart).to_have_js_property("complete", True)
        assert chart.evaluate("img => img.naturalWidth") > 0, f"{chart.get_attribute('src')} did not load"
    learn = page.get_by_role("button", name="Learn thresholds from reviews")
    check_layout(page, "quality", learn)
    page.set_viewport_size(README_WIDTH)
    page.screenshot(path=str(SCREENSHOTS / "quality.jpg"), type="jpeg", quality=70, full_page=True)

    learn.click()
    expect(page.locator(".flash").first).to_contain_text("Learned new thresholds for")
    expect(page.locator("h2").first).to_contain_text("Promotion gate: passed")
    activate_button = page.get_by_role("button", name="Activate")
    check_layout(page, "learned-thresholds", activate_button)
    activate_button.click()
    expect(page.locator(".flash").first).to_contain_text("is now the active Research tasks model")
    expect(page.locator(".badge.ok")).to_have_text("active")
