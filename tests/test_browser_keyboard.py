"""Keyboard-first review in a real browser (issue 12 point 3, static/js/review_keys.js): a curator reviews 50 queue
items with the keyboard alone (accepts, label toggles then save, skips, one save-undo) and the stored events are
exactly what was typed; "?" shows the key map; keys never fire while typing; each next item opens with focus on
its first label. The same 50 items by mouse on the page's buttons give the same events and the baseline. The seconds
per item go to the folder ``$PAPERTAG_BENCH_OUT`` (default ``test-artifacts/bench``) for ``bench/review_keyboard.py``
to print: nothing here asserts a duration."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Browser, Page, expect
from sqlalchemy import select

from tests import test_browser
from tests.conftest import BundleFactory
from tests.test_browser import DESKTOP, PHONE, SLUG, Site, predict, sign_in
from webapp.config import REPO_ROOT
from webapp.extensions import db
from webapp.models import AnnotationEvent
from webapp.serving.registry import import_bundle

browser, site, page = test_browser.browser, test_browser.site, test_browser.page
ITEMS = 50
BENCH_OUT = Path(os.environ.get("PAPERTAG_BENCH_OUT") or REPO_ROOT / "test-artifacts" / "bench")
# What the curator types on item i (cycling): (keys, the event kinds it records).
SCRIPT = [
    (["a"], ["accepted"]),
    (["1", "2", "Enter"], ["correction"]),
    (["k"], ["skipped"]),
    (["3", "s"], ["correction"]),
    (["a"], ["accepted"]),
]
DOCS = REPO_ROOT / "docs" / "screenshots"
FIELDS, FIELD_LABELS = "fields", ["Biology", "Chemistry", "Physics", "Mathematics", "Economics"]
UNDO_AT = 17  # on this item: toggle, Shift+S (save, stay), u (undo), then a (accept and next)
# The button each key presses, for the mouse baseline.
CLICKS = {"a": "Accept and next", "Enter": "Save and next", "s": "Save and next", "k": "Skip"}
CLICKS |= {"Shift+S": "Save changes", "u": "Undo my last change"}


def current_id(page: Page) -> int:
    return int(page.url.split("/curate/predictions/")[1].split("?")[0].split("#")[0])


def boxes(page: Page, slug: str = SLUG) -> list[tuple[str, bool]]:
    """A taxonomy's label boxes in key order: (label, ticked)."""
    return page.locator(f"#tax-{slug} fieldset.checks input[type=checkbox]").evaluate_all(
        "els => els.map(el => [el.value, el.checked])"
    )


def expect_ready(page: Page, prediction_id: int) -> None:
    """The item is loaded and its first label box has the focus: keys act on it at once."""
    page.wait_for_url(f"**/curate/predictions/{prediction_id}?*")
    first = page.locator(f"#tax-{SLUG} fieldset.checks input[type=checkbox]").first
    expect(first).to_be_focused()


def events(site: Site) -> list[tuple[int, str, list[str], list[str]]]:
    with site.app.app_context():
        rows = db.session.scalars(select(AnnotationEvent).order_by(AnnotationEvent.id)).all()
        return [(e.prediction_id, e.kind, sorted(e.added or []), sorted(e.removed or [])) for e in rows]


def toggled(before: list[tuple[str, bool]], keys: list[str]) -> tuple[list[str], list[str]]:
    """The labels that pressing these digit keys adds and removes."""
    flips = [before[int(key) - 1] for key in keys if key.isdigit()]
    return sorted(label for label, on in flips if not on), sorted(label for label, on in flips if on)


def test_fifty_queue_items_by_keyboard_alone(page: Page, site: Site, abstracts: list[dict]) -> None:
    review_fifty(page, site, abstracts, "keys", page.keyboard.press)


def test_the_same_fifty_items_by_mouse_as_the_baseline(page: Page, site: Site, abstracts: list[dict]) -> None:
    """The same script with the pointer on the page's own buttons and boxes (what works without JavaScript): the
    same events, and the baseline that bench/review_keyboard.py sets the keyboard's seconds against."""

    def click(key: str) -> None:
        if key.isdigit():
            page.locator(f"#tax-{SLUG} fieldset.checks input[type=checkbox]").nth(int(key) - 1).click()
        else:
            page.get_by_role("button", name=CLICKS[key], exact=True).click()

    review_fifty(page, site, abstracts, "clicks", click)


def review_fifty(page: Page, site: Site, abstracts: list[dict], mode: str, press: Callable[[str], None]) -> None:
    """Review 50 queue items with SCRIPT, each key given to ``press``; the events must be exactly the script's.
    The seconds per item go to ``<PAPERTAG_BENCH_OUT>/review-<mode>.json``."""
    # 60 queue items: each fixture abstract three times under a different title.
    papers = [{**a, "title": f"{a['title']} ({n})"} for n in range(3) for a in abstracts]
    predict(site, papers)
    sign_in(page, "cora")
    page.wait_for_url("**/curate/queue")
    page.get_by_role("link", name="Start reviewing").focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**/curate/predictions/*queue=1*")
    expect_ready(page, current_id(page))

    expected: list[tuple[int, str, list[str], list[str]]] = []
    seconds: list[float] = []
    for i in range(ITEMS):
        item = current_id(page)
        keys, kinds = SCRIPT[i % len(SCRIPT)]
        before = boxes(page)
        started = time.perf_counter()
        if i == UNDO_AT:
            added, removed = toggled(before, ["1"])
            for key in ["1", "Shift+S"]:
                press(key)
            expect(page.locator(".flash").filter(has_text="Saved Research tasks")).to_have_count(1)
            expect_ready(page, item)
            press("u")
            expect(page.locator(".flash").filter(has_text="undid event")).to_have_count(1)
            expect_ready(page, item)
            press("a")
            expected += [(item, "correction", added, removed), (item, "undo", [], []), (item, "accepted", [], [])]
        else:
            for key in keys:
                press(key)
            added, removed = toggled(before, keys)
            expected += [(item, kind, added, removed) for kind in kinds]
        page.wait_for_url(lambda url, item=item: f"/curate/predictions/{item}?" not in url)
        if i < ITEMS - 1:
            expect_ready(page, current_id(page))
        seconds.append(time.perf_counter() - started)

    assert events(site) == expected, f"the stored events are not exactly what was done ({mode})"
    assert len({prediction for prediction, *_ in expected}) == ITEMS
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    (BENCH_OUT / f"review-{mode}.json").write_text(
        json.dumps({"items": ITEMS, "seconds_per_item": seconds, "script": [keys for keys, _ in SCRIPT]}, indent=1)
    )


def test_help_overlay_and_no_keys_while_typing(
    page: Page, site: Site, abstracts: list[dict], make_bundle: BundleFactory
) -> None:
    with site.app.app_context():  # a second taxonomy, to move between sections with ] and [
        import_bundle(make_bundle(seed=5, slug=FIELDS, name="Fields", labels=FIELD_LABELS), actor="tests")
    (prediction_id,) = predict(site, abstracts[:1])
    sign_in(page, "cora", f"/curate/predictions/{prediction_id}")
    page.wait_for_url(f"**/curate/predictions/{prediction_id}")
    first = page.locator(f"#tax-{FIELDS} fieldset.checks input[type=checkbox]").first
    expect(first).to_be_focused()
    expect(page.get_by_role("button", name="Keyboard: ?")).to_be_visible()

    # "?" opens the map of every key; "?" or Escape closes it.
    help_dialog = page.get_by_role("dialog", name="Keyboard shortcuts")
    expect(help_dialog).to_be_hidden()
    page.keyboard.press("?")
    expect(help_dialog).to_be_visible()
    terms = help_dialog.locator("dt").all_inner_texts()
    for key in ["a", "Enter", "s", "Shift+S", "k", "u", "1", "0", "/", "n", "]", "?", "Esc"]:
        assert any(key in term.split() for term in terms), f"the help does not list {key!r}: {terms}"
    for viewport, suffix in ((DESKTOP, ""), (PHONE, "-375px")):  # the key map, for the README
        page.set_viewport_size(viewport)
        page.screenshot(path=str(DOCS / f"review-keys{suffix}.png"))
    page.set_viewport_size(DESKTOP)
    page.keyboard.press("a")  # keys do nothing under the help
    page.keyboard.press("?")
    expect(help_dialog).to_be_hidden()
    page.get_by_role("button", name="Keyboard: ?").click()
    expect(help_dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(help_dialog).to_be_hidden()

    # "/" jumps to the label search; typing there ("a", "s", digits) is text, not commands.
    page.keyboard.press("/")
    search = page.locator(f"#add-{FIELDS}")
    expect(search).to_be_focused()
    page.keyboard.type("as 12 k u")
    expect(search).to_have_value("as 12 k u")
    before = first.is_checked()
    search.fill("")
    page.keyboard.press("Escape")  # leaves the field: the keys work again
    expect(first).to_be_focused()
    page.keyboard.press("1")
    assert first.is_checked() is (not before)
    page.keyboard.press("n")
    expect(page.locator(f"#note-{FIELDS}")).to_be_focused()
    page.keyboard.type("a note")
    page.keyboard.press("Escape")
    assert events(site) == [], "a key fired while typing"

    # "]" and "[" move between taxonomies; the digits then act on the section that has the focus.
    sections = page.locator("section.curate")
    first_section = sections.first
    second = sections.nth(1)
    second_box = second.locator("fieldset.checks input[type=checkbox]").first
    second_before = second_box.is_checked()
    page.keyboard.press("]")
    expect(second_box).to_be_focused()
    expect(second).to_have_class(re.compile(r"\bcurrent-section\b"))
    page.keyboard.press("1")
    assert second_box.is_checked() is (not second_before)
    page.keyboard.press("1")
    page.keyboard.press("[")
    expect(first_section.locator("fieldset.checks input[type=checkbox]").first).to_be_focused()

    # Outside a queue Enter saves and stays; the note typed above goes with it.
    page.keyboard.press("Enter")
    expect(page.locator(".flash").filter(has_text="Saved Fields")).to_have_count(1)
    assert [kind for _, kind, *_ in events(site)] == ["correction"]
    expect(page.locator(f"#tax-{FIELDS} .events")).to_contain_text("a note")


def test_without_javascript_the_buttons_do_it_all(browser: Browser, site: Site, abstracts: list[dict]) -> None:
    """No script: no key hints, no help button, the navigation in full, and the review's buttons still record."""
    context = browser.new_context(base_url=site.url, java_script_enabled=False, viewport=PHONE)
    try:
        page = context.new_page()
        (prediction_id,) = predict(site, abstracts[:1])
        sign_in(page, "cora", f"/curate/predictions/{prediction_id}")
        page.wait_for_url(f"**/curate/predictions/{prediction_id}")
        expect(page.get_by_role("button", name="Keyboard: ?")).to_be_hidden()
        expect(page.get_by_role("button", name="Menu")).to_be_hidden()
        expect(page.locator("header.topbar").get_by_role("link", name="Review queue")).to_be_visible()
        expect(page.locator(".key-hint")).to_have_count(0)
        page.get_by_role("button", name="Accept", exact=True).click()
        expect(page.locator(".flash").filter(has_text="accepted the labels")).to_have_count(1)
        assert [kind for _, kind, *_ in events(site)] == ["accepted"]
    finally:
        context.close()


def test_labels_past_the_ninth_by_zero_and_shift_digits(
    page: Page, site: Site, abstracts: list[dict], make_bundle: BundleFactory
) -> None:
    many = [f"Task {n:02d}" for n in range(1, 16)]
    with site.app.app_context():
        import_bundle(make_bundle(seed=7, slug="many", name="Many tasks", labels=many), actor="tests")
    (prediction_id,) = predict(site, abstracts[2:3])
    sign_in(page, "cora", f"/curate/predictions/{prediction_id}")
    page.wait_for_url(f"**/curate/predictions/{prediction_id}")
    section = page.locator("#tax-many")
    # By keys only: add labels through the search until the section shows more than 11 boxes, then save and stay.
    current = {label for label, on in boxes(page, "many") if on}
    for label in [label for label in many if label not in current][:8]:
        page.keyboard.press("/")
        page.keyboard.type(label)
        page.keyboard.press("Enter")
        page.keyboard.press("Escape")
    page.keyboard.press("Shift+S")
    expect(page.locator(".flash").filter(has_text="Saved Many tasks")).to_have_count(1)
    before = boxes(page, "many")
    assert len(before) >= 11, before
    hints = section.locator(".key-hint").all_inner_texts()
    assert hints[:11] == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "⇧1"], hints
    page.keyboard.press("0")
    page.keyboard.press("Shift+Digit1")
    after = boxes(page, "many")
    flipped = [i for i, (was, now) in enumerate(zip(before, after, strict=True)) if was[1] != now[1]]
    assert flipped == [9, 10], f"0 and Shift+1 should toggle the 10th and 11th labels, toggled {flipped}"
