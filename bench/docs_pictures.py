"""Regenerate the review-page pictures in docs/ with the shipped model, in headless Chromium.

    python -m segengine.bench.docs_pictures --out docs [--data ../shared/data/lgg]

Runs `segengine run` with the shipped model over three real patients (two slice folders and
one 4D NIfTI, as the browser test does), opens OUT/index.html and one patient's review.html
from file:// in Debian's ``chromium`` driven by Playwright (nothing is downloaded), and writes
``review_page.png`` and ``review_patient.png`` into ``--out``. The page driving lives here,
once: tests/test_review_page.py imports it and asserts on the same pages.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path(os.environ.get("SEGENGINE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1150, "height": 820}
# two reference-validation patients (the second has a small tumor) as slice folders, one training patient as a NIfTI
SLICE_PATIENTS = ("TCGA_CS_6668_20011025", "TCGA_DU_7014_19860618")
NIFTI_PATIENT = "TCGA_CS_4941_19960909"
SHOWN_PATIENT = SLICE_PATIENTS[1]  # the patient whose viewer is pictured
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg"
INDEX_PICTURE, PATIENT_PICTURE = "review_page.png", "review_patient.png"


class BrowserMissing(RuntimeError):
    """Chromium or Playwright is not installed: the caller decides (a test skips or fails, the script exits 2)."""


def review_run(data: Path, work: Path, model: Path | None = None, slice_patients=SLICE_PATIENTS,
               nifti_patient: str | None = NIFTI_PATIENT) -> tuple[Path, str]:
    """`segengine run --patients` over copies of ``slice_patients`` and ``nifti_patient`` written
    as a 4D NIfTI without ground truth (a row with mm3 and no DSC); returns (OUT, the run's output).
    Raises RuntimeError with the command's output if the run fails."""
    import nibabel as nib
    import numpy as np
    from click.testing import CliRunner

    from segengine.bench.nifti_agreement import kaggle_to_input_grid
    from segengine.engine.cli import main
    from segengine.engine.readers.registry import read_patient

    root = work / "in"
    root.mkdir(parents=True)
    for p in slice_patients:
        shutil.copytree(data / p, root / p)
    if nifti_patient:
        image, affine = kaggle_to_input_grid(read_patient(data / nifti_patient, with_mask=False).image)
        nib.save(nib.Nifti1Image(image.astype(np.int16) * 9, affine), str(root / f"{nifti_patient}.nii.gz"))
    out = work / "results"  # the page's title names this folder, as after the README's first command
    args = ["run", "--patients", str(root), "--out", str(out)] + (["--model", str(model)] if model else [])
    res = CliRunner().invoke(main, args)
    if res.exit_code != 0:
        raise RuntimeError(f"segengine run failed (exit {res.exit_code}): {res.output}")
    return out, res.output


@contextmanager
def browser_context() -> Iterator:
    """A Playwright persistent context of Debian's Chromium (a private throw-away profile, no download)."""
    if not CHROMIUM.exists():
        raise BrowserMissing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BrowserMissing("Playwright for Python is not installed (pip install -e '.[dev]')") from None
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                                        headless=True, viewport=VIEWPORT)
        try:
            yield context
        finally:
            context.close()


def open_page(context, url: str):
    """A page at ``url`` that records console errors, page errors and every request it makes
    (``page.problems``, ``page.requests``): the pages must work offline and cleanly."""
    page = context.new_page()
    page.problems, page.requests = [], []
    page.on("console", lambda m: page.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: page.problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(url)
    page.wait_for_load_state("load")
    return page


def open_index(context, out: Path):
    """OUT/index.html with every thumbnail decoded (they load lazily)."""
    page = open_page(context, (out / "index.html").as_uri())
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    return page


def open_patient(index_page, out: Path, patient: str):
    """Follow the index's link to ``patient``'s viewer; returns once it shows its opening slice
    (the one with the largest predicted area, from the patient's report)."""
    index_page.locator("#patients a", has_text=patient).click()
    index_page.wait_for_load_state("load")
    report = json.loads((out / patient / "report.json").read_text())
    areas = report["tumor_area_px_per_slice"]
    focus = max(report["slice_numbers"], key=lambda n: areas[str(n)])
    index_page.wait_for_function(f"document.getElementById('flair').dataset.slice === '{focus}'")
    return index_page


def take_pictures(context, out: Path, patient: str = SHOWN_PATIENT) -> dict[str, bytes]:
    """PNG bytes of the index (whole page) and of ``patient``'s viewer (the window), as docs/ shows them."""
    index = open_index(context, out)
    pictures = {INDEX_PICTURE: index.screenshot(full_page=True)}
    page = open_patient(index, out, patient)
    pictures[PATIENT_PICTURE] = page.screenshot()
    if page.problems:
        raise RuntimeError("the pages reported problems: " + "; ".join(page.problems))
    return pictures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for review_page.png and review_patient.png (docs)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding the patients' slice folders (Kaggle .tif or the shared WebP/PNG layout)")
    parser.add_argument("--model", type=Path, default=None, help="weights to run (default: the shipped model)")
    args = parser.parse_args(argv)
    missing = [p for p in (*SLICE_PATIENTS, NIFTI_PATIENT) if not (args.data / p).is_dir()]
    if missing:
        print(f"error: {args.data}: no patient folder {', '.join(missing)}", file=sys.stderr)
        return 2
    if not args.out.is_dir():
        print(f"error: {args.out}: no such folder", file=sys.stderr)
        return 2
    from segengine.engine.core.atomic import write_bytes_atomic

    with tempfile.TemporaryDirectory() as work:
        try:
            out, _ = review_run(args.data, Path(work), args.model)
            with browser_context() as context:
                pictures = take_pictures(context, out)
        except (BrowserMissing, RuntimeError) as exc:
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
    for name, png in pictures.items():  # both pictures only once both are taken: nothing partial in docs/
        write_bytes_atomic(args.out / name, png)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
