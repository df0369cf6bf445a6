"""A person in the Dagster UI: headless Chromium (Debian's, driven by Playwright) opens the default asset
graph of a tiny pipeline, clicks "Materialize all", and sees the run succeed, the checks pass and the
evaluation report's metadata. Screenshots are saved under the test's temporary folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.test_ui import good_workspace, newest_runs_once_finished, running_dagster_dev  # noqa: F401 (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
def test_materialize_all_in_the_browser(good_workspace: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed: run the tests with `make test`, which installs it")

    shots = tmp_path / "screenshots"
    shots.mkdir()
    log = tmp_path / "dagster_dev.log"
    with running_dagster_dev(good_workspace["workspace"], good_workspace["home"], log) as port, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        base = f"http://127.0.0.1:{port}"

        # A fresh instance shows a "Join the Dagster community" dialog that fades in at an unpredictable moment
        # and swallows clicks; Playwright skips it whenever it is in the way of an action or an assertion.
        page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                                 lambda: page.get_by_role("button", name="Skip").click())

        page.goto(f"{base}/asset-groups/gate", wait_until="networkidle")
        expect(page.get_by_text("evaluation_report").first).to_be_visible(timeout=60_000)
        materialize_all = page.get_by_role("button", name="Materialize all")
        expect(materialize_all).to_be_enabled(timeout=60_000)
        page.screenshot(path=str(shots / "1-asset-graph.png"))
        materialize_all.click()
        runs = newest_runs_once_finished(port, 480)
        assert runs and runs[0]["status"] == "SUCCESS", log.read_text()[-5000:]
        run_id = runs[0]["runId"]
        # The button launched one run of the whole group (Dagster's implicit asset job), every asset selected.
        assert len(runs) == 1 and {"/".join(a["path"]) for a in runs[0]["assetSelection"]} == {
            f"gate/{name}" for name in ("raw_data", "cleaned_dataset", "splits", "base_model",
                                        "finetuned_checkpoint", "evaluation_report")}

        page.goto(f"{base}/runs/{run_id}", wait_until="networkidle")
        expect(page.get_by_text("Success").first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(shots / "2-run.png"))
        page.goto(f"{base}/assets/gate/splits?view=checks", wait_until="networkidle")
        for name in ("splits_do_not_overlap", "every_class_in_train_and_test"):
            expect(page.get_by_text(name).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Passed").first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(shots / "3-checks.png"))
        page.goto(f"{base}/assets/gate/evaluation_report", wait_until="networkidle")
        for key in ("macro_f1", "beats_majority_class", "promotion", "mlflow_run", "confusion_matrix_image",
                    "loss_curve_image"):
            expect(page.get_by_text(key, exact=True).first).to_be_visible(timeout=60_000)
        # The kinds name the tools; metrics show four decimals.
        expect(page.get_by_role("img", name="mlflow").first).to_be_visible(timeout=60_000)  # an icon
        expect(page.get_by_text("matplotlib", exact=True).first).to_be_visible(timeout=60_000)
        assert not page.get_by_text(re.compile(r"^0\.\d{5,}$")).count()
        page.screenshot(path=str(shots / "4-evaluation-report.png"), full_page=True)
        show_picture(page, "confusion_matrix_image", shots / "4b-confusion-matrix.png")

        page.goto(f"{base}/assets/gate/finetuned_checkpoint", wait_until="networkidle")
        show_picture(page, "loss_curve", shots / "5-loss-curve.png")

        # report.html, as a colleague opens it from a mail: one file, pictures inline, the verdict first.
        [html] = (good_workspace["data"] / "reports" / "gate").glob("*/report.html")
        alone = tmp_path / "sent" / "report.html"
        alone.parent.mkdir()
        shutil.copy(html, alone)
        page.goto(alone.as_uri(), wait_until="load")
        headings = page.locator("h2").all_inner_texts()
        assert headings[0].startswith("Metrics") and headings[-1].startswith("Lineage"), headings
        for title in ("Per class", "Sample errors: ", "Training and validation loss", "Confusion matrix"):
            assert any(h.startswith(title) for h in headings), (title, headings)
        expect(page.locator("#summary")).to_contain_text("beat")
        assert pictures_shown(page, 3) == page.locator("img").count()
        page.screenshot(path=str(shots / "6-report-html.png"), full_page=True)
        browser.close()
    assert sorted(p.name for p in shots.iterdir()) == ["1-asset-graph.png", "2-run.png", "3-checks.png",
                                                       "4-evaluation-report.png", "4b-confusion-matrix.png",
                                                       "5-loss-curve.png", "6-report-html.png"]


def show_picture(page: object, key: str, shot: Path) -> None:
    """Open a picture's Markdown metadata on the asset page (the UI shows it in a dialog) and see it drawn."""
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    row = page.get_by_role("row").filter(has=page.get_by_text(key, exact=True))
    expect(row.first).to_be_visible(timeout=60_000)
    row.first.get_by_text("[Show Markdown]").click()
    pictures_shown(page, 1)
    page.wait_for_timeout(800)  # the dialog's fade-in, for a screenshot a person can read
    page.screenshot(path=str(shot))
    page.keyboard.press("Escape")


def pictures_shown(page: object, at_least: int) -> int:
    """How many inline PNG pictures (<img src="data:image/png...">) on the page were decoded and drawn (one that
    failed to load has no natural width); asserts at least `at_least`, waiting for them to load."""
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    drawn = ("[...document.images].filter(i => i.src.startsWith('data:image/png') && i.complete && "
             "i.naturalWidth > 0).length")
    page.wait_for_function(f"() => {drawn} >= {at_least}", timeout=60_000)
    return page.evaluate(drawn)
