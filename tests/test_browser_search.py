"""Search that finds, in a real browser (issue 12 point 8): the history's search finds a paper from its title's words
typed in another order and case, most relevant first; choosing a taxonomy refills the label suggestions from the
JSON endpoint (static/js/label-suggest.js, no inline script under the CSP); a label typed in another case and with
spaces for underscores filters that taxonomy's labels; a misspelt label is named with the right one to click; row
labels are grouped per taxonomy. Screenshots at 1280 and 375 px go to ``docs/screenshots/``."""

from __future__ import annotations

import shutil

from playwright.sync_api import Locator, Page, expect

from tests import test_browser
from tests.conftest import BundleFactory, live_models_of
from tests.test_browser import SCREENSHOTS, Site, check_layout, predict
from webapp.serving.registry import import_bundle

# The browser, the served site and the checked page, as tests/test_browser.py sets them up.
browser, site, page = test_browser.browser, test_browser.site, test_browser.page
DOCS = test_browser.REPO_ROOT / "docs" / "screenshots"
TOPICS = ["graph_learning", "Object Detection"]


def screenshots(page: Page, name: str, main_action: Locator) -> None:
    """check_layout's screenshots at 1280 and 375 px, kept in docs/screenshots for the README."""
    check_layout(page, name, main_action)
    DOCS.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-375px"):
        shutil.copy(SCREENSHOTS / f"{name}{suffix}.png", DOCS / f"{name}{suffix}.png")


def test_search_and_label_filter_in_the_history(
    page: Page, site: Site, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    with site.app.app_context():  # a second taxonomy that tags every paper with both of its labels
        import_bundle(
            make_bundle(seed=4, slug="test-topics", name="Test topics", threshold=0.001, labels=TOPICS), actor="tests"
        )
    live_models_of(site.app).refresh()
    predict(site, abstracts[:6])
    wanted = abstracts[2]["title"]

    page.goto("/history")
    # The title's longer words, reversed and lower-cased: still found, and first.
    words = [w for w in wanted.replace(":", " ").split() if len(w) > 4][:4]
    page.fill("input[name=q]", " ".join(reversed(words)).lower())
    page.get_by_role("button", name="Filter").click()
    expect(page.locator(".history-title").first).to_have_text(wanted)

    page.get_by_role("link", name="Clear").click()
    suggestions = page.locator("#known-labels option")
    expect(suggestions).not_to_have_count(len(TOPICS))  # every taxonomy's labels before one is chosen
    page.select_option("select[name=taxonomy]", "test-topics")
    expect(page.locator("#known-labels")).to_have_attribute("data-taxonomy", "test-topics")
    expect(suggestions).to_have_count(len(TOPICS))
    assert [o.get_attribute("value") for o in suggestions.all()] == TOPICS

    page.fill("input[name=label]", "GRAPH LEARNING")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator(".history-item")).to_have_count(6)
    expect(page.locator("select[name=taxonomy]")).to_have_value("test-topics")
    for item in page.locator(".history-item").all():  # labels shown per taxonomy
        expect(item.locator('[data-taxonomy="test-topics"] .chips')).to_contain_text("graph_learning")
        expect(item.locator('[data-taxonomy="research-tasks"]')).to_be_visible()
    screenshots(page, "history-search", page.get_by_role("button", name="Filter"))

    page.fill("input[name=label]", "graph lerning")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("[data-label-unknown]")).to_contain_text("No label reads “graph lerning” in this taxonomy")
    expect(page.locator(".history-item")).to_have_count(0)
    page.locator("[data-label-unknown]").get_by_role("link", name="graph_learning").click()
    expect(page.locator(".history-item")).to_have_count(6)
    expect(page.locator("input[name=label]")).to_have_value("graph_learning")
