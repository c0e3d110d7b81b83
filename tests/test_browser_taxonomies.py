"""The two shipped taxonomies side by side in a real browser: a fresh site imports both default bundles (the real
int8 models under ``models/``), a visitor tags an abstract and reads one result card per taxonomy. Saves the
README's screenshot (``test-artifacts/screenshots/taxonomies.jpg``, 1100 px wide) and checks the 375 px layout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from playwright.sync_api import Page, expect

from tests import test_browser
from tests.conftest import make_app
from tests.test_browser import SCREENSHOTS, check_layout, checked_page, served
from webapp.config import REPO_ROOT

browser = test_browser.browser
README_VIEWPORT = {"width": 1100, "height": 900}
TITLE = "Speech enhancement with a lightweight convolutional recurrent network"
ABSTRACT = (
    "Speech enhancement aims to remove background noise from noisy speech. We present a causal convolutional "
    "recurrent network that removes background noise from speech on a hearing "
    "aid processor. Trained on noisy recordings, it improves PESQ and STOI over spectral subtraction and a "
    "transformer baseline on the VoiceBank-DEMAND and DNS Challenge benchmarks while using 2 ms of lookahead."
)


@pytest.fixture
def shipped_site(tmp_path: Path) -> Iterator[tuple[str, Flask]]:
    """A fresh app whose first start imports every bundle under ``models/`` (what ``make run`` does)."""
    app = make_app(tmp_path / "data", DEFAULT_BUNDLES_DIR=str(REPO_ROOT / "models"))
    result = app.test_cli_runner().invoke(args=["models", "import-defaults"])
    assert result.exit_code == 0, result.output
    with served(app) as url:
        yield url, app


@pytest.fixture
def page(browser, shipped_site: tuple[str, Flask]) -> Iterator[Page]:
    with checked_page(browser, shipped_site[0], README_VIEWPORT) as opened:
        yield opened


def test_one_abstract_tagged_by_both_shipped_taxonomies(page: Page) -> None:
    page.goto("/")
    page.fill("#title", TITLE)
    page.fill("#abstract", ABSTRACT)
    page.get_by_role("button", name="Tag it").click()
    page.wait_for_url("**/predictions/*?new=1")
    cards = page.locator("section.result")
    expect(cards).to_have_count(2)
    expect(page.locator("#tax-research-tasks")).to_have_text("Research tasks")
    expect(page.locator("#tax-arxiv-categories")).to_have_text("arXiv categories")
    arxiv = page.locator("section.result", has=page.locator("#tax-arxiv-categories"))
    arxiv_labels = arxiv.locator("ul.labels").first.locator(".label-row:not(.missed) .label-name").all_inner_texts()
    assert "eess.AS" in arxiv_labels, arxiv_labels
    tasks = page.locator("section.result", has=page.locator("#tax-research-tasks"))
    task_labels = tasks.locator("ul.labels").first.locator(".label-row:not(.missed) .label-name").all_inner_texts()
    assert "Speech Enhancement" in task_labels, task_labels
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "taxonomies.jpg"), type="jpeg", quality=70, full_page=True)
    check_layout(page, "taxonomies", page.get_by_role("link", name="Tag another"))
