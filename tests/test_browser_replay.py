"""Replay before promotion in a real browser: an admin replays the inactive version from the models page, reads
what would change (with reviewed predictions it now gets right), then activates it from the replay page. Saves
the README's screenshot (``test-artifacts/screenshots/replay.jpg``, 1100 px wide) and checks the 375 px layout."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests import test_browser
from tests.conftest import BundleFactory
from tests.test_browser import SCREENSHOTS, SLUG, Site, check_layout, predict, sign_in
from tests.tiny_bundle import LABELS
from webapp.serving.bundle import compose_text
from webapp.serving.inference import LoadedModel

# The browser, the served site and the checked page, as tests/test_browser.py sets them up.
browser, site, page = test_browser.browser, test_browser.site, test_browser.page
README_VIEWPORT = {"width": 1100, "height": 900}


def correct(site: Site, prediction_id: int, labels: list[str]) -> None:
    """A curator's correction through the annotations API."""
    runner = site.app.test_cli_runner()
    plain = runner.invoke(args=["tokens", "create", "cora", "--role", "curator"]).output.strip().splitlines()[-1]
    response = site.app.test_client().post(
        f"/api/v1/predictions/{prediction_id}/annotations",
        json={"taxonomy": SLUG, "labels": labels, "note": "checked by hand"},
        headers={"Authorization": f"Bearer {plain}"},
    )
    assert response.status_code == 201, response.get_data(as_text=True)


def test_admin_replays_a_candidate_then_activates_it(
    page: Page, site: Site, abstracts: list[dict], make_bundle: BundleFactory
) -> None:
    papers = abstracts[:12]
    ids = predict(site, papers)
    candidate = LoadedModel(make_bundle(seed=4, slug=SLUG, name="Research tasks", labels=LABELS))
    texts = [compose_text(p["title"], p["abstract"]) for p in papers]
    candidate_labels = [candidate.predicted(scored) for scored in candidate.score(texts)]
    correct(site, ids[0], candidate_labels[0])  # exactly what the candidate says
    correct(site, ids[1], ["Machine Translation", "Question Answering"])

    sign_in(page, "ada")
    page.goto("/models")
    page.locator("tr", has=page.get_by_text(site.other, exact=True)).get_by_role("button", name="Replay").click()
    expect(page.locator(".flash").first).to_contain_text(f"Replay #1 of {site.other} against {site.active}")
    # The replay runs in the background; its page polls the job and shows the report once it finished.
    expect(page.locator(".stats")).to_contain_text("Reviewed among them", timeout=test_browser.WAIT_MS)
    expect(page.get_by_role("heading", name="Per label")).to_be_visible()
    page.set_viewport_size(README_VIEWPORT)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "replay.jpg"), type="jpeg", quality=70, full_page=True)
    activate = page.get_by_role("button", name=f"Activate {site.other}")
    check_layout(page, "replay", activate)

    activate.click()
    expect(page.locator(".flash").first).to_contain_text(f"{site.other} is now the active Research tasks model")
    expect(page.locator("h1 + .badge")).to_have_text("active")
