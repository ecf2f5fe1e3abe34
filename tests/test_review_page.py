"""The review page of a real 3-patient run, opened from file:// in a real headless Chromium.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it), driven by Playwright
pointed at that executable: nothing is downloaded at run time. Under CI=true a missing
browser or driver fails the test; elsewhere it skips and says why.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, TRAIN_PATIENT, VAL_PATIENTS, running_in_ci
from segengine.bench.nifti_agreement import kaggle_to_input_grid
from segengine.engine.cli import main
from segengine.engine.readers.registry import read_patient
from segengine.engine.outputs.review_page import IMAGE_BUDGET_BYTES, write_index
from test_run import MODEL

CHROMIUM = Path(os.environ.get("SEGENGINE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PATIENTS = sorted(VAL_PATIENTS + [TRAIN_PATIENT])


def _missing(reason: str):
    if running_in_ci():
        pytest.fail(f"{reason} (CI must run the browser test; .ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def reviewed_run(kaggle_root, tmp_path_factory):
    """`segengine run` over three real patients (two tif folders, one 4D NIfTI), then one report
    given issue 12's review field and the page regenerated with `segengine report`."""
    root = tmp_path_factory.mktemp("review-root")
    for p in VAL_PATIENTS:
        shutil.copytree(kaggle_root / p, root / p)
    # the third patient as a 4D NIfTI without ground truth: a row with mm3 and without DSC
    data, affine = kaggle_to_input_grid(read_patient(kaggle_root / TRAIN_PATIENT).image)
    nib.save(nib.Nifti1Image(data.astype(np.int16) * 9, affine), str(root / f"{TRAIN_PATIENT}.nii.gz"))
    out = tmp_path_factory.mktemp("review-out") / "out"
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patients", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "index.html").is_file()
    report_path = out / VAL_PATIENTS[1] / "report.json"
    rep = json.loads(report_path.read_text())
    rep["review"] = {"flag": True, "reasons": ["example flag set by the browser test"], "features": {}}
    report_path.write_text(json.dumps(rep))
    res = CliRunner().invoke(main, ["report", str(out)])
    # the forced flag plus whatever the shipped card's calibrated rules flag among the other two
    flagged = sum(json.loads(r.read_text())["review"]["flag"] for r in out.glob("*/report.json"))
    assert 1 <= flagged <= 3 and res.exit_code == 0 and f"3 patients, {flagged} flagged" in res.output, res.output
    return out


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed (pip install -e '.[dev]')")
    import tempfile

    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                                        headless=True, viewport={"width": 1150, "height": 820})
        yield context
        context.close()


def _open(context, url: str):
    """A page at ``url`` that records console errors, page errors and every request it makes."""
    page = context.new_page()
    page.problems, page.requests = [], []
    page.on("console", lambda m: page.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: page.problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(url)
    page.wait_for_load_state("load")
    return page


def _column(page, index: int) -> list[str]:
    return page.eval_on_selector_all("#patients tbody tr:not(.hidden)", f"rs => rs.map(r => r.cells[{index}].dataset.sort)")


def test_index_rows_sort_and_filter(browser, reviewed_run):
    out = reviewed_run
    page = _open(browser, (out / "index.html").as_uri())
    rows = page.locator("#patients tbody tr")
    assert rows.count() == 3
    assert page.locator("#shown").inner_text() == "3 of 3 shown"
    # thumbnails: lazy, and really decoded from files beside the page
    assert page.eval_on_selector_all("#patients img", "is => is.every(i => i.loading === 'lazy')")
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    # sorting by tumor volume: ascending, then descending, against the reports on disk
    volumes = {p: json.loads((out / p / "report.json").read_text())["tumor_volume_px"] for p in PATIENTS}
    header = page.locator("#patients th", has_text="tumor volume px")
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    assert _column(page, 1) == [p.lower() for p in sorted(PATIENTS, key=volumes.get)]
    header.click()
    assert _column(page, 1) == [p.lower() for p in sorted(PATIENTS, key=volumes.get, reverse=True)]
    page.locator("#patients th", has_text="patient").click()
    assert _column(page, 1) == [p.lower() for p in PATIENTS]
    # filtering: by text, then flagged only
    page.fill("#filter", VAL_PATIENTS[0][-8:])
    assert _column(page, 1) == [VAL_PATIENTS[0].lower()]
    page.fill("#filter", "")
    nifti_row = page.locator("#patients tbody tr", has_text=TRAIN_PATIENT)
    assert nifti_row.locator("td").nth(5).inner_text() != "—"  # mm3 known from the NIfTI header
    assert nifti_row.locator("td").nth(7).inner_text() == "—"  # no ground truth, no DSC
    page.check("#flagged")  # the forced flag, and any the shipped card's rules raised on the reports on disk
    flagged = [p for p in PATIENTS if json.loads((out / p / "report.json").read_text())["review"]["flag"]]
    assert VAL_PATIENTS[1] in flagged and _column(page, 1) == [p.lower() for p in flagged]
    forced = page.locator("#patients tbody tr:not(.hidden)", has_text=VAL_PATIENTS[1])
    assert "example flag set by the browser test" in forced.inner_text()
    assert page.locator("#shown").inner_text() == f"{len(flagged)} of 3 shown"
    page.uncheck("#flagged")
    assert page.locator("#patients tbody tr:not(.hidden)").count() == 3
    page.screenshot(path=str(REPO / "docs" / "review_page.png"), full_page=True)
    assert page.problems == []
    assert all(u.startswith(("file://", "data:")) for u in page.requests), page.requests  # no network


def test_patient_viewer_slider_keys_and_toggles(browser, reviewed_run):
    out = reviewed_run
    index = _open(browser, (out / "index.html").as_uri())
    index.locator("#patients a", has_text=VAL_PATIENTS[1]).click()
    index.wait_for_load_state("load")
    page = index
    assert page.url.endswith(f"{VAL_PATIENTS[1]}/review.html")
    viewer = page.locator(".viewer")
    report = json.loads((out / VAL_PATIENTS[1] / "report.json").read_text())
    numbers, areas = report["slice_numbers"], report["tumor_area_px_per_slice"]
    focus = max(numbers, key=lambda n: areas[str(n)])  # opens on the slice with the largest predicted area
    page.wait_for_function(f"document.getElementById('flair').dataset.slice === '{focus}'")
    assert f"predicted {areas[str(focus)]} px" in page.locator("#label").inner_text()
    assert "example flag set by the browser test" in page.locator(".facts").inner_text()  # re-rendered by `report`
    before = viewer.screenshot()
    step = 1 if focus < numbers[-1] else -1
    page.keyboard.press("ArrowRight" if step == 1 else "ArrowLeft")
    assert page.locator("#flair").get_attribute("data-slice") == str(focus + step)
    assert viewer.screenshot() != before  # the shown slice changed, not only its label
    page.locator("#slider").fill("0")
    assert page.locator("#flair").get_attribute("data-slice") == str(numbers[0])
    assert page.locator("#label").inner_text().startswith(f"slice {numbers[0]} (1 of {len(numbers)})")
    page.locator("#slider").fill(str(numbers.index(focus)))
    with_outlines = viewer.screenshot()
    page.uncheck("#show-pred")
    page.uncheck("#show-truth")
    assert viewer.screenshot() != with_outlines
    page.check("#show-pred")
    page.check("#show-truth")
    page.screenshot(path=str(REPO / "docs" / "review_patient.png"))
    # links to the masks and the NIfTI resolve to files that exist
    for href in page.eval_on_selector_all(".links a", "as => as.map(a => a.href)"):
        from urllib.parse import unquote, urlparse

        assert Path(unquote(urlparse(href).path)).exists(), href
    assert page.problems == [] and index.problems == []
    assert all(u.startswith(("file://", "data:")) for u in page.requests), page.requests


# ------------------------------------------------------------------ without a browser
def test_images_stay_within_the_budget(reviewed_run):
    for p in PATIENTS:
        size = sum(f.stat().st_size for f in (reviewed_run / p / "review").iterdir())
        assert 0 < size <= IMAGE_BUDGET_BYTES


def test_a_large_noisy_volume_is_shrunk_to_the_budget(tmp_path):
    """Worst case for JPEG (noise) and a large grid: tiles shrink until the images fit."""
    from segengine.engine.readers.volume import PatientVolume
    from segengine.engine.outputs.review_page import write_patient_review

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 300, 340, 3), dtype=np.uint8)
    pred = np.zeros(image.shape[:3], bool)
    pred[20:30, 100:150, 120:200] = True
    vol = PatientVolume("noise", tmp_path, list(range(1, 61)), image)
    write_patient_review(tmp_path, vol, pred, None, {})
    assert sum(f.stat().st_size for f in (tmp_path / "review").iterdir() if f.suffix != ".js") <= IMAGE_BUDGET_BYTES
    data = (tmp_path / "review" / "viewer.js").read_text()
    assert '"height":300,"width":340' in data and '"focus":20' in data


def test_index_handles_reports_without_review_and_damaged_ones(reviewed_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reviewed_run, out)
    (out / PATIENTS[0] / "report.json").write_text("{ truncated")
    rep = json.loads((out / VAL_PATIENTS[0] / "report.json").read_text())
    rep["review"] = {"flag": False, "reasons": [], "note": "this model's card has no calibrated review rules"}
    (out / VAL_PATIENTS[0] / "report.json").write_text(json.dumps(rep))
    (out / ".TCGA_X.partial-123").mkdir()  # a writer's temporary folder: not a patient
    path, n, flagged = write_index(out)
    text = path.read_text()
    assert n == 2 and flagged == 1 and "1 unreadable report" in text and "partial" not in text
    assert text.count("no calibrated review rules") == 1  # said once in the summary, not in every row
    assert [p.name for p in out.iterdir() if p.name.startswith(".index")] == []  # no temp file left


def test_report_command_on_a_missing_folder_is_one_line(tmp_path):
    res = CliRunner().invoke(main, ["report", str(tmp_path / "absent")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "no such folder" in res.output


def test_report_rewrites_a_patient_page_only_under_its_lock(reviewed_run, tmp_path):
    """`segengine report` writes into OUT/<id> as runs do: under the patient's lock; a patient
    whose lock another process holds keeps its page (its writer renders a fresh one)."""
    from segengine.engine.outputs.results_dir import LOCK_SUFFIX, PatientLock

    out = tmp_path / "out"
    shutil.copytree(reviewed_run, out)
    for p in VAL_PATIENTS:
        rep = json.loads((out / p / "report.json").read_text())
        rep["review"] = {"flag": True, "reasons": [f"reason for {p}"], "features": {"tumor_slices": 3},
                         "note": "rules from the lead's cross-validation"}
        (out / p / "report.json").write_text(json.dumps(rep))
    busy, free = VAL_PATIENTS
    with PatientLock(out, busy):
        write_index(out)
    assert f"reason for {busy}" not in (out / busy / "review.html").read_text()
    assert f"reason for {free}" in (out / free / "review.html").read_text()
    index = (out / "index.html").read_text()
    assert f"reason for {busy}" in index and f"reason for {free}" in index  # the index reads every report
    assert not [p.name for p in out.iterdir() if p.name.endswith(LOCK_SUFFIX)]  # locks go with their holders
