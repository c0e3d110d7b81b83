"""Review states and current labels in a real browser (issue 12 points 1 and 2): one Save keeps the edits of every
taxonomy on the page, undo reverses the curator's own latest change, Accept confirms, the queue's Skip and Accept
and next move on; history and the prediction page then show the current labels with the model's one click away.
Screenshots of the review page and the reviewed history at 1280 and 375 px go to ``docs/screenshots/``."""

from __future__ import annotations

import shutil

from playwright.sync_api import Locator, Page, expect
from sqlalchemy import select

from tests import test_browser
from tests.conftest import BundleFactory
from tests.test_browser import SCREENSHOTS, SLUG, Site, check_layout, predict, sign_in
from webapp.curation.annotations import label_views
from webapp.extensions import db
from webapp.models import AnnotationEvent, PredictionResult, Taxonomy
from webapp.serving.registry import import_bundle

# The browser, the served site and the checked page, as tests/test_browser.py sets them up.
browser, site, page = test_browser.browser, test_browser.site, test_browser.page
DOCS = test_browser.REPO_ROOT / "docs" / "screenshots"
FIELDS = "fields"
FIELD_LABELS = ["Biology", "Chemistry", "Physics", "Mathematics", "Economics"]


def screenshots(page: Page, name: str, main_action: Locator) -> None:
    """check_layout's screenshots at 1280 and 375 px, kept in docs/screenshots for the README."""
    check_layout(page, name, main_action)
    DOCS.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-375px"):
        shutil.copy(SCREENSHOTS / f"{name}{suffix}.png", DOCS / f"{name}{suffix}.png")


def kinds(site: Site, prediction_id: int) -> list[str]:
    with site.app.app_context():
        return list(
            db.session.scalars(
                select(AnnotationEvent.kind)
                .where(AnnotationEvent.prediction_id == prediction_id)
                .order_by(AnnotationEvent.id)
            )
        )


def chips(section: Locator) -> list[str]:
    return section.locator(".inline-chips").first.locator(".chip").all_inner_texts()


def test_one_save_for_every_taxonomy_undo_and_accept(
    page: Page, site: Site, abstracts: list[dict], make_bundle: BundleFactory
) -> None:
    with site.app.app_context():
        import_bundle(make_bundle(seed=5, slug=FIELDS, name="Fields", labels=FIELD_LABELS), actor="tests")
    (prediction_id,) = predict(site, abstracts[5:6])
    sign_in(page, "cora", f"/curate/predictions/{prediction_id}")
    page.wait_for_url(f"**/curate/predictions/{prediction_id}")
    tasks, fields = page.locator(f"#tax-{SLUG}"), page.locator(f"#tax-{FIELDS}")
    expect(fields).to_be_visible()
    model_tasks, model_fields = chips(tasks), chips(fields)

    # An edit under each taxonomy, then the *first* taxonomy's Save: both edits are kept.
    box = tasks.locator(f"input[name='{SLUG}-labels']").first
    box.set_checked(not box.is_checked())
    near_miss = fields.locator(f"input[name='{FIELDS}-labels']:not(:checked)").first
    added = near_miss.get_attribute("value")
    near_miss.check()
    screenshots(page, "review", page.get_by_role("button", name="Accept", exact=True))
    tasks.get_by_role("button", name="Save", exact=True).click()
    flashes = page.locator(".flash")
    expect(flashes.filter(has_text="Saved Research tasks")).to_have_count(1)
    expect(flashes.filter(has_text=f"Saved Fields: added {added}")).to_have_count(1)
    assert added in chips(fields) and chips(tasks) != model_tasks
    assert kinds(site, prediction_id) == ["correction", "correction"]
    expect(fields.get_by_text("reviewed: corrected")).to_be_visible()

    # Undo the Fields change: the model's labels are back, and the undo is an event of its own.
    fields.get_by_role("button", name="Undo my last change").click()
    expect(page.locator(".flash").filter(has_text="Saved Fields: undid event")).to_have_count(1)
    assert sorted(chips(fields)) == sorted(model_fields)
    expect(fields.get_by_text("not reviewed")).to_be_visible()

    # Accept: Fields unchanged is confirmed as it stands; Research tasks keeps its correction.
    page.get_by_role("button", name="Accept", exact=True).click()
    expect(page.locator(".flash").filter(has_text="Saved Fields: accepted the labels")).to_have_count(1)
    expect(fields.get_by_text("reviewed: accepted")).to_be_visible()
    assert kinds(site, prediction_id) == ["correction", "correction", "undo", "accepted", "accepted"]

    # History: the current labels with the review, the model's one click away.
    page.goto("/history")
    item = page.locator(".history-item").filter(has=page.locator(f"a[href='/predictions/{prediction_id}']"))
    row = item.locator(f"[data-taxonomy='{SLUG}']")
    expect(row.locator("[data-review=corrected]")).to_be_visible()
    summary = row.get_by_text("The model's labels")
    screenshots(page, "history-reviewed", summary)
    expect(row.locator("details .chip").first).to_be_hidden()
    summary.click()
    assert sorted(row.locator("details .chip").all_inner_texts()) == sorted(model_tasks)

    # The prediction page: current labels first, the model's below.
    page.goto(f"/predictions/{prediction_id}")
    current = page.locator(f"#current-{SLUG} .chip").all_inner_texts()
    assert sorted(current) == chips_after(site, prediction_id) != sorted(model_tasks)
    current_box = page.locator(".current-labels").bounding_box()
    model_box = page.get_by_role("heading", name="What the model said").bounding_box()
    assert current_box and model_box and current_box["y"] < model_box["y"]


def test_a_label_typed_then_saved_with_one_click_is_saved(page: Page, site: Site, abstracts: list[dict]) -> None:
    """Leaving the box turns the typed label into a chip; made while the mouse is pressed on Save, that moved Save
    from under the pointer and the click was lost (nothing sent, nothing said)."""
    (prediction_id,) = predict(site, abstracts[7:8])
    sign_in(page, "cora", f"/curate/predictions/{prediction_id}")
    page.wait_for_url(f"**/curate/predictions/{prediction_id}")
    tasks = page.locator(f"#tax-{SLUG}")
    assigned = set(chips(tasks))
    label = next(
        value
        for value in page.locator(f"#vocab-{SLUG} option").evaluate_all("(options) => options.map((o) => o.value)")
        if value not in assigned
    )
    page.locator(f"#add-{SLUG}").fill(label.lower())  # typed, in other capitals
    tasks.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator(".flash").filter(has_text=f"added {label}")).to_have_count(1)
    assert label in chips_after(site, prediction_id)


def chips_after(site: Site, prediction_id: int) -> list[str]:
    """The current research-task labels as the server computes them (the page must agree)."""
    with site.app.app_context():
        result = db.session.scalar(
            select(PredictionResult)
            .join(Taxonomy, Taxonomy.id == PredictionResult.taxonomy_id)
            .where(PredictionResult.prediction_id == prediction_id, Taxonomy.slug == SLUG)
        )
        return sorted(label_views([result])[result.id].labels)


def test_the_queue_skips_to_the_back_and_accept_and_next_moves_on(
    page: Page, site: Site, abstracts: list[dict]
) -> None:
    predict(site, abstracts[:3])
    sign_in(page, "cora")
    page.wait_for_url("**/curate/queue")
    expect(page.get_by_text("3 to review")).to_be_visible()
    order = [int(text.split(" ")[0][1:]) for text in page.locator(".history-item .meta").all_inner_texts()]
    page.get_by_role("link", name="Start reviewing").click()
    page.wait_for_url(f"**/curate/predictions/{order[0]}?queue=1*")
    page.get_by_role("button", name="Skip").click()
    page.wait_for_url(f"**/curate/predictions/{order[1]}?queue=1*")
    expect(page.locator(".flash").filter(has_text="skipped")).to_have_count(1)
    page.get_by_role("button", name="Accept and next").click()
    page.wait_for_url(f"**/curate/predictions/{order[2]}?queue=1*")
    expect(page.locator(".flash").filter(has_text="accepted the labels")).to_have_count(1)
    page.goto("/curate/queue")
    expect(page.get_by_text("2 to review")).to_be_visible()
    after = [int(text.split(" ")[0][1:]) for text in page.locator(".history-item .meta").all_inner_texts()]
    assert after == [order[2], order[0]], "the accepted item left, the skipped one went to the back"
