"""The review page of a real 3-patient run, opened from file:// in a real headless Chromium.

Chromium is Debian's ``chromium`` package (``.ci/setup`` installs it), driven by Playwright
pointed at that executable: nothing is downloaded at run time. Under CI=true a missing
browser or driver fails the test; elsewhere it skips and says why. The run and the page
driving are bench/docs_pictures.py's (the command that regenerates docs/review_*.png);
screenshots taken here go to a temporary folder, never into docs/.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import TRAIN_PATIENT, VAL_PATIENTS, running_in_ci
from segengine.bench.docs_pictures import (INDEX_PICTURE, PATIENT_PICTURE, VIEWPORT, BrowserMissing, browser_context,
                                           open_index, open_patient, review_run, take_pictures)
from segengine.engine.cli import main
from segengine.engine.outputs.review_page import IMAGE_BUDGET_BYTES, write_index
from test_run import MODEL

PATIENTS = sorted(VAL_PATIENTS + [TRAIN_PATIENT])
SHOWN = VAL_PATIENTS[1]  # the patient given a forced flag and opened in the viewer
ORANGE, BLUE = (230, 159, 0), (86, 180, 233)  # the viewer's predicted and ground-truth outline colours


def _missing(reason: str):
    if running_in_ci():
        pytest.fail(f"{reason} (CI must run the browser test; .ci/setup installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def reviewed_run(kaggle_root, tmp_path_factory):
    """`segengine run` over three real patients (two tif folders, one 4D NIfTI), then one report
    given issue 12's review field and the page regenerated with `segengine report`."""
    out, _ = review_run(kaggle_root, tmp_path_factory.mktemp("review"), MODEL, VAL_PATIENTS, TRAIN_PATIENT)
    assert (out / "index.html").is_file()
    by_rules = {p for p in PATIENTS if json.loads((out / p / "report.json").read_text())["review"]["flag"]}
    report_path = out / SHOWN / "report.json"
    rep = json.loads(report_path.read_text())
    rep["review"] = {"flag": True, "reasons": ["example flag set by the browser test"], "features": {}}
    report_path.write_text(json.dumps(rep))
    res = CliRunner().invoke(main, ["report", str(out)])
    # the summary counts the reports on disk: the card's rules' flags from the run plus the forced one
    assert res.exit_code == 0 and f"3 patients, {len(by_rules | {SHOWN})} flagged" in res.output, res.output
    return out


@pytest.fixture(scope="module")
def browser():
    try:
        with browser_context() as context:
            yield context
    except BrowserMissing as exc:
        _missing(str(exc))


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _count(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= 2).sum())


def _outline(mask_tif: Path) -> np.ndarray:
    """Pixels of the mask with a face neighbour outside it (the image edge counts as outside),
    written here with plain numpy shifts, independently of the engine's scipy erosion."""
    m = np.pad(tifffile.imread(mask_tif) > 0, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m[1:-1, 1:-1] & ~inner


def _column(page, index: int) -> list[str]:
    return page.eval_on_selector_all("#patients tbody tr:not(.hidden)", f"rs => rs.map(r => r.cells[{index}].dataset.sort)")


def test_index_rows_sort_and_filter(browser, reviewed_run):
    out = reviewed_run
    page = open_index(browser, out)  # returns once every thumbnail is decoded from its file beside the page
    rows = page.locator("#patients tbody tr")
    assert rows.count() == 3
    assert page.locator("#shown").inner_text() == "3 of 3 shown"
    assert page.eval_on_selector_all("#patients img", "is => is.every(i => i.loading === 'lazy')")
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
    assert SHOWN in flagged and _column(page, 1) == [p.lower() for p in flagged]
    forced = page.locator("#patients tbody tr:not(.hidden)", has_text=SHOWN)
    assert "example flag set by the browser test" in forced.inner_text()
    assert forced.locator(".flag").get_attribute("title").startswith("flagged for review")
    # the legend says what the review column means: the estimate, its interval, the flag's rule, "check input"
    legend = page.locator("#legend")
    assert "How to read the review column" in legend.inner_text()
    page.locator("#legend summary").click()
    text = legend.inner_text()
    for words in ("expected DSC", "90% interval", "set when the expected DSC is below 0.80", "check input",
                  "uncalibrated", "training patients' median"):
        assert words in text, words
    assert page.locator("#shown").inner_text() == f"{len(flagged)} of 3 shown"
    page.uncheck("#flagged")
    assert page.locator("#patients tbody tr:not(.hidden)").count() == 3
    assert page.problems == []
    assert all(u.startswith(("file://", "data:")) for u in page.requests), page.requests  # no network


def _viewer_state(page) -> tuple[np.ndarray, int]:
    """The viewer's pixels as shown and the slice number it says it shows."""
    return _pixels(page.locator(".viewer").screenshot()), int(page.locator("#flair").get_attribute("data-slice"))


def _expected_outlines(out: Path, truth_root: Path, patient: str, n: int) -> tuple[int, int]:
    """Screen pixels of red and green outline at slice ``n``, from the mask files: the 256-pixel
    slice is drawn 512 px wide (2 x 2 screen pixels a voxel), the prediction over the truth."""
    pred = _outline(out / patient / f"{patient}_{n}_mask.tif")
    truth = _outline(truth_root / patient / f"{patient}_{n}_mask.tif")
    return 4 * int(pred.sum()), 4 * int((truth & ~pred).sum())


def test_patient_viewer_slider_keys_and_toggles(browser, reviewed_run, kaggle_root):
    out = reviewed_run
    page = open_patient(open_index(browser, out), out, SHOWN)  # waits for the slice with the largest predicted area
    assert page.url.endswith(f"{SHOWN}/review.html")
    report = json.loads((out / SHOWN / "report.json").read_text())
    numbers, areas = report["slice_numbers"], report["tumor_area_px_per_slice"]
    focus = max(numbers, key=lambda n: areas[str(n)])
    assert f"predicted {areas[str(focus)]} px" in page.locator("#label").inner_text()
    assert "example flag set by the browser test" in page.locator(".facts").inner_text()  # re-rendered by `report`
    controls = page.locator(".controls").inner_text()
    assert "predicted (orange)" in controls and "ground truth (blue)" in controls
    assert "How to read the review column" in page.locator("#legend").inner_text()
    # the outlines drawn are those of the mask files written, pixel for pixel
    before, shown = _viewer_state(page)
    assert shown == focus
    red, green = _expected_outlines(out, kaggle_root, SHOWN, focus)
    assert red > 0 and (_count(before, ORANGE), _count(before, BLUE)) == (red, green)
    step = 1 if focus < numbers[-1] else -1
    page.keyboard.press("ArrowRight" if step == 1 else "ArrowLeft")
    after, shown = _viewer_state(page)
    assert shown == focus + step
    assert (_count(after, ORANGE), _count(after, BLUE)) == _expected_outlines(out, kaggle_root, SHOWN, focus + step)
    grey = (before == before[..., :1]).all(axis=-1) & (after == after[..., :1]).all(axis=-1)
    assert (before[grey] != after[grey]).any()  # the FLAIR under the outlines changed, not only its label
    page.locator("#slider").fill("0")
    assert page.locator("#flair").get_attribute("data-slice") == str(numbers[0])
    assert page.locator("#label").inner_text().startswith(f"slice {numbers[0]} (1 of {len(numbers)})")
    page.locator("#slider").fill(str(numbers.index(focus)))
    page.uncheck("#show-pred")
    hidden, _ = _viewer_state(page)
    assert _count(hidden, ORANGE) == 0 and _count(hidden, BLUE) == 4 * int(_outline(kaggle_root / SHOWN / f"{SHOWN}_{focus}_mask.tif").sum())
    page.uncheck("#show-truth")
    bare, _ = _viewer_state(page)
    assert _count(bare, ORANGE) == _count(bare, BLUE) == 0
    # links to the masks and the NIfTI resolve to files that exist
    for href in page.eval_on_selector_all(".links a", "as => as.map(a => a.href)"):
        from urllib.parse import unquote, urlparse

        assert Path(unquote(urlparse(href).path)).exists(), href
    assert page.problems == []
    assert all(u.startswith(("file://", "data:")) for u in page.requests), page.requests


def test_docs_pictures_show_the_pages(browser, reviewed_run, tmp_path):
    """What `python -m segengine.bench.docs_pictures` writes into docs/, taken here into a temp
    folder: the whole index (as tall as the page's layout says) and the viewer's window, with
    the predicted outline drawn."""
    pictures = take_pictures(browser, reviewed_run, SHOWN)
    for name, png in pictures.items():
        (tmp_path / name).write_bytes(png)
    index, viewer = _pixels((tmp_path / INDEX_PICTURE).read_bytes()), _pixels((tmp_path / PATIENT_PICTURE).read_bytes())
    page = open_index(browser, reviewed_run)
    height = page.evaluate("document.documentElement.scrollHeight")
    assert index.shape == (height, VIEWPORT["width"], 3) and height > 3 * 64  # three rows of thumbnails at least
    assert viewer.shape == (VIEWPORT["height"], VIEWPORT["width"], 3) and _count(viewer, ORANGE) > 0
    assert (index.std(axis=(0, 1)) > 1).all()  # a rendered page, not a blank one


def test_docs_pictures_command_refuses_a_missing_data_folder(tmp_path, capsys):
    from segengine.bench import docs_pictures

    assert docs_pictures.main(["--out", str(tmp_path), "--data", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no patient folder" in err and list(tmp_path.iterdir()) == []


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


CALIBRATED = {"expected_dsc": 0.9, "interval": [0.8, 0.95], "calibration": "out of fold, 90 patients"}


@pytest.mark.parametrize("report, label, why", [
    ({"review": {**CALIBRATED, "flag": False, "reasons": [], "features": {}}}, "ok", None),
    ({"review": {**CALIBRATED, "flag": False, "reasons": ["pre-contrast is a copy of FLAIR (a missing sequence filled in)"],
                 "features": {"copied_channels": ["pre-contrast"]}}}, "⚠ check input", "pre-contrast is a copy of FLAIR"),
    ({"review": {**CALIBRATED, "flag": False, "reasons": [],
                 "features": {"intensity_z": 4.25, "intensity_z_channel": "FLAIR"}}}, "⚠ check input", "robust z 4.2"),
    ({"review": {"flag": None, "reasons": [], "features": {}}, "nifti": {"filled_with_flair": ["pre", "post"]}},
     "⚠ check input", "pre and post filled with FLAIR"),
    ({"review": {**CALIBRATED, "expected_dsc": 0.61, "flag": True, "reasons": ["mask of 40 voxels (training patients' "
                 "median 9000)"], "features": {"copied_channels": ["post-contrast"]}}}, "⚑ review", "mask of 40 voxels"),
], ids=["ok", "copied-channel", "intensity", "filled-uncalibrated", "flagged"])
def test_review_cell_explains_itself_and_never_says_ok_for_an_odd_input(report, label, why):
    """Every label and reason carries a tooltip; an input anomaly is "check input", never a plain "ok"."""
    import re

    from segengine.engine.outputs.review_page import _review_cell, patient_html

    cell = _review_cell(report)
    labels = re.findall(r'<span class="(\w+)" title="([^"]+)">([^<]+)</span>', cell)
    assert labels and labels[0][2] == label
    assert all(tip for _, tip, _ in labels)
    if label != "ok":
        assert 'class="ok"' not in cell
    if label == "⚑ review":
        assert "expected DSC 0.610 is below 0.80" in labels[0][1]
    if report["review"].get("expected_dsc") is not None:
        est = next(tip for cls, tip, _ in labels if cls == "est")
        assert "Dice overlap" in est and "90% interval" in est and "cross-validation" in est
    reasons = re.findall(r'<div class="why" title="([^"]+)">([^<]+)</div>', cell)
    if why:
        assert any(why in html_text.replace("&#x27;", "'") for _, html_text in reasons), reasons
        assert all(tip for tip, _ in reasons)
    page = patient_html("p", {**report, "patient": "p"})
    assert 'id="legend"' in page and "90% interval" in page
