"""Label surgery in a real browser: an admin opens a taxonomy's Labels page from the models page, previews and
applies a rename and a keyword split, finds the renamed label's items in the history and on a result page, and
undoes the split. Saves the README's screenshot (``test-artifacts/screenshots/labels.jpg``, 1100 px wide) and
checks the 375 px layout."""

from __future__ import annotations

from playwright.sync_api import Page, expect
from sqlalchemy import select

from tests import test_browser
from tests.test_browser import SCREENSHOTS, SLUG, Site, check_layout, predict, sign_in
from webapp.extensions import db
from webapp.models import PredictionResult

# The browser, the served site and the checked page, as tests/test_browser.py sets them up.
browser, site, page = test_browser.browser, test_browser.site, test_browser.page
README_VIEWPORT = {"width": 1100, "height": 900}


def stored_labels(site: Site) -> dict[int, list[str]]:
    with site.app.app_context():
        return {r.prediction_id: list(r.labels) for r in db.session.scalars(select(PredictionResult))}


def test_admin_renames_and_splits_labels_then_undoes(page: Page, site: Site, abstracts: list[dict]) -> None:
    predict(site, abstracts[:12])
    stored = stored_labels(site)
    tally = sorted(
        {label for labels in stored.values() for label in labels}, key=lambda x: -sum(x in v for v in stored.values())
    )
    renamed, split = tally[0], tally[1]
    carrying = sorted(pid for pid, labels in stored.items() if renamed in labels)

    sign_in(page, "ada")
    page.goto("/models")
    page.get_by_role("link", name="Labels", exact=True).click()
    expect(page.locator("h1")).to_have_text("Labels of Research tasks")
    rename = page.locator("section#rename")
    rename.locator("#rename-label").select_option(renamed)
    rename.locator("#rename-to").fill(f"{renamed} (all kinds)")
    rename.get_by_role("button", name="Preview").click()
    expect(page.locator("section#rename [data-preview]")).to_contain_text(f"{len(carrying)} stored prediction(s)")
    page.locator("section#rename").get_by_role("button", name="Apply rename").click()
    expect(page.locator(".flash").first).to_contain_text("Change #1 applied")

    splitting = page.locator("section#split")
    splitting.locator("#split-label").select_option(split)
    splitting.locator("#split-targets").fill(f"{split} for images: image, images, visual\n{split} (other)")
    splitting.locator("#split-note").fill("images apart")
    splitting.get_by_role("button", name="Preview").click()
    expect(page.locator("section#split [data-preview]")).to_contain_text(f"{split} for images:")
    page.set_viewport_size(README_VIEWPORT)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "labels.jpg"), type="jpeg", quality=70, full_page=True)
    apply_split = page.locator("section#split").get_by_role("button", name="Apply split")
    check_layout(page, "labels", apply_split)
    apply_split.click()
    expect(page.locator(".flash").first).to_contain_text("Change #2 applied")
    expect(page.get_by_role("button", name="Undo #2")).to_be_visible()

    page.goto("/history")
    page.fill("input[name=label]", f"{renamed} (all kinds)")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator(".history-item")).to_have_count(len(carrying))
    page.locator(".history-title").first.click()
    expect(page.locator("section.result")).to_contain_text(f"{renamed} (all kinds)")

    page.goto(f"/taxonomies/{SLUG}/labels")
    page.get_by_role("button", name="Undo #2").click()
    expect(page.locator(".flash").first).to_contain_text("Change #2 undone")
    expect(page.locator("table").first).to_contain_text(split)
