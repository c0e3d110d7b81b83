"""Bulk actions and curator agreement in a real browser (issue 12 points 4 and 5): ticking rows (with "tick all
on this page") and adding a label after the confirmation page; the same without JavaScript for everything a
filter matches; an adjudicator resolving a disagreement on /agreement. Screenshots of the confirmation page and
the agreement page at 1280 and 375 px go to ``docs/screenshots/``."""

from __future__ import annotations

from playwright.sync_api import Browser, Page, expect
from sqlalchemy import select

from tests import test_browser
from tests.conftest import PASSWORD, add_user
from tests.test_browser import SLUG, Site, predict, sign_in
from tests.test_browser_review import screenshots
from webapp.extensions import db
from webapp.models import AnnotationEvent, PredictionResult

browser, site, page = test_browser.browser, test_browser.site, test_browser.page


def events(site: Site) -> list[tuple[int, str, list[str]]]:
    with site.app.app_context():
        rows = db.session.scalars(select(AnnotationEvent).order_by(AnnotationEvent.id))
        return [(e.prediction_id, e.kind, e.added) for e in rows]


def model_labels(site: Site, pid: int) -> list[str]:
    with site.app.app_context():
        return db.session.scalars(select(PredictionResult.labels).where(PredictionResult.prediction_id == pid)).one()


def test_tick_all_on_the_page_add_a_label_and_confirm(page: Page, site: Site, abstracts: list[dict]) -> None:
    ids = predict(site, abstracts[:6])
    label = next(lab for lab in test_browser.LABELS if any(lab not in model_labels(site, pid) for pid in ids))
    lacking = [pid for pid in ids if label not in model_labels(site, pid)]
    sign_in(page, "cora", "/history")
    page.goto("/history")
    page.locator("#bulk summary").click()
    page.locator("#bulk-all-page").check()
    expect(page.locator(".bulk-box:checked")).to_have_count(6)
    page.select_option("#bulk-form select[name=action]", "add")
    page.select_option("#bulk-form select[name=taxonomy]", SLUG)
    page.fill("#bulk-form input[name=label]", label)
    page.get_by_role("button", name="Review the change…").click()
    summary = page.locator("[data-bulk-summary]")
    expect(summary).to_contain_text(f"add “{label}” (Research tasks) to {len(lacking)} prediction")
    assert events(site) == []  # nothing recorded before the confirmation
    confirm = page.get_by_role("button", name=f"Confirm: change {len(lacking)} prediction")
    screenshots(page, "bulk-confirm", confirm)
    confirm.click()
    expect(page.locator(".flash").first).to_contain_text("Done: add")
    assert page.url.endswith("/history")
    assert sorted((pid, kind, added) for pid, kind, added in events(site)) == [
        (p, "correction", [label]) for p in sorted(lacking)
    ]


def test_without_javascript_accept_everything_a_filter_matches(
    browser: Browser, site: Site, abstracts: list[dict]
) -> None:
    ids = predict(site, abstracts[:4])
    context = browser.new_context(base_url=site.url, java_script_enabled=False, viewport=test_browser.DESKTOP)
    try:
        page = context.new_page()
        sign_in(page, "cora", "/curate/queue")
        page.goto(f"/curate/queue?taxonomy={SLUG}")
        expect(page.locator(".bulk-js")).to_be_hidden()  # the JavaScript-only box stays hidden
        page.locator("#bulk summary").click()
        page.get_by_label("all 4 matching this filter").check()
        page.get_by_role("button", name="Review the change…").click()
        expect(page.locator("[data-bulk-summary]")).to_contain_text(
            "accept the labels (Research tasks) of 4 predictions"
        )
        page.get_by_role("button", name="Confirm: change 4 predictions").click()
        expect(page.locator(".flash").first).to_contain_text("Done: accept")
        expect(page.locator("main")).to_contain_text("Nothing left to review")
        assert sorted(pid for pid, kind, _ in events(site) if kind == "accepted") == sorted(ids)
    finally:
        context.close()


def test_an_adjudicator_resolves_a_disagreement(page: Page, site: Site, abstracts: list[dict]) -> None:
    site.app.config["REVIEWS_NEEDED"] = 2
    ids = predict(site, abstracts[:3])
    client = site.app.test_client()
    first, second = test_browser.LABELS[:2]
    for name, chosen in (("ann", [first]), ("ben", [second])):
        add_user(site.app, name, "curator")
        token = (
            site.app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", "curator"]).output.split()[-1]
        )
        for pid in ids:
            body = {"taxonomy": SLUG, "labels": chosen, "note": f"{name} read it"}
            response = client.post(
                f"/api/v1/predictions/{pid}/annotations", json=body, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 201, response.get_json()
    add_user(site.app, "jo", "adjudicator", PASSWORD)
    sign_in(page, "jo", "/agreement")
    page.goto("/agreement")
    item = page.locator(f'[data-prediction="{ids[0]}"]')
    expect(item.locator('[data-reviewer="ann"]')).to_contain_text(first)
    expect(item.locator('[data-reviewer="ben"]')).to_contain_text(second)
    expect(page.locator("[data-overall-alpha]")).to_be_visible()
    resolve = item.get_by_role("button", name="Resolve")
    screenshots(page, "agreement", resolve)
    item.get_by_label(first).check()
    item.get_by_label(second).check()
    resolve.click()
    expect(page.locator(".flash").first).to_contain_text(f"Resolved #{ids[0]}")
    expect(page.locator(f'[data-prediction="{ids[0]}"] [data-resolved]')).to_contain_text("Resolved by jo")
    with site.app.app_context():
        final = db.session.scalars(select(AnnotationEvent.added).where(AnnotationEvent.kind == "adjudicated")).one()
    assert final == sorted([first, second])
