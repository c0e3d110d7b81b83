"""Explanations and similar papers in a real browser: Explain on a prediction's page highlights the sentences as
the API scores them, another label re-colours them without a new request, the keyboard alone works, and the similar
past abstracts show a curator's reviewed labels. Saves the README's screenshot
(``test-artifacts/screenshots/explain.jpg``, 1100 px wide) and checks the 375 px layout."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests import test_browser
from tests.test_browser import SCREENSHOTS, SLUG, Site, check_layout, predict
from tests.test_browser_replay import correct
from webapp.evidence.explain import heat_class

# The browser, the served site and the checked page, as tests/test_browser.py sets them up.
browser, site, page = test_browser.browser, test_browser.site, test_browser.page
README_VIEWPORT = {"width": 1100, "height": 900}


def expected_classes(entry: dict) -> list[str]:
    scale = max(abs(s["drop"]) for s in entry["sentences"])
    return [heat_class(s["drop"], scale) if s["read"] else "unread" for s in entry["sentences"]]


def test_explain_highlights_sentences_and_similar_papers_show_reviews(
    page: Page, site: Site, abstracts: list[dict]
) -> None:
    ids = predict(site, abstracts[:8])
    client = site.app.test_client()
    nearest = client.get(f"/api/v1/predictions/{ids[0]}/similar?k=1").get_json()["results"][SLUG]["similar"][0]
    correct(site, nearest["id"], ["Machine Translation", "Question Answering"])
    answer = client.get(f"/api/v1/predictions/{ids[0]}/explanation").get_json()["explanations"][SLUG]
    entries = {entry["label"]: entry for entry in answer["labels"]}
    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url) if "/explanation" in request.url else None)

    page.goto(f"/predictions/{ids[0]}")
    panel = page.locator(f"#explain-{SLUG}")
    sentences = panel.locator(".explain-text [data-sentence]")
    expect(panel.locator("[data-explained]")).to_be_hidden()
    panel.get_by_label("Label").focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # the keyboard alone explains
    expect(panel.locator("[data-explained]")).to_be_visible()
    first = panel.get_by_label("Label").input_value()
    expect(panel.locator("[data-explain-status]")).to_contain_text(f"{first}: {entries[first]['score'] * 100:.1f}%")
    classes = [c.split()[-1] for c in sentences.evaluate_all("spans => spans.map(s => s.className)")]
    # The page colours exactly what the API measured. Whether some sentence raised the label is the tiny test
    # model's business (its outputs vary from run to run), so it is not asserted here.
    assert classes == expected_classes(entries[first]), "the page's highlights differ from the API's drops"

    other = next(label for label in entries if label != first)
    panel.get_by_label("Label").select_option(other)
    expect(panel.locator("[data-explain-status]")).to_contain_text(f"{other}:")
    classes = [c.split()[-1] for c in sentences.evaluate_all("spans => spans.map(s => s.className)")]
    assert classes == expected_classes(entries[other])
    assert len(fetched) == 1, f"changing the label should re-colour, not fetch again: {fetched}"

    similar = page.locator("section.similar")
    expect(similar.locator(".similar-item")).to_have_count(5)
    reviewed = similar.locator(".similar-item", has=page.locator(".badge.ok"))
    expect(reviewed).to_have_count(1)
    # The current labels; the model's own sit folded under them (details), one click away.
    expect(reviewed.locator(":scope > ul.chips > .chip")).to_have_text(["Machine Translation", "Question Answering"])

    panel.get_by_label("Label").select_option(first)
    page.set_viewport_size(README_VIEWPORT)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "explain.jpg"), type="jpeg", quality=70, full_page=True)
    check_layout(page, "explain", panel.get_by_role("button", name="Explain"))
