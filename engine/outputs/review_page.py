"""The review page: ``OUT/index.html`` over a batch, ``OUT/<patient>/review.html`` per patient.

Static files that work from file:// with no server and no network: every script, style and
datum is inline; images are files beside the pages. Per patient the engine writes, inside
its atomic result folder, one JPEG sprite of the FLAIR slices, a WebP thumbnail and the
page (outlines travel as pixel indices, drawn by the page), so the cost per patient stays a
few JPEG/WebP encodes. The index is rebuilt from the ``report.json`` files in OUT (by
every ``run`` and by ``segengine report OUT``) and replaced atomically, so two runs writing
the same OUT leave a whole page from one of them.
"""
from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np

from segengine.engine.core.atomic import write_text_atomic
from segengine.engine.core.errors import NoSlicesError, NotAFolderError, OutputError
from segengine.engine.postprocessing.postprocess import border
from segengine.engine.readers.volume import PatientVolume

REVIEW_DIR = "review"  # per-patient assets, inside OUT/<patient>/


PATIENT_PAGE = "review.html"


VIEWER_DATA = "viewer.js"  # slice numbers, outlines and areas, beside the sprite


INDEX_PAGE = "index.html"


THUMB_SIDE = 128


TILE_MAX_SIDE = 256  # sprite tiles: slices larger than this are scaled down


IMAGE_BUDGET_BYTES = 900_000  # per patient, sprite + thumbnail


SPRITE_COLUMNS = 8


# ---------------------------------------------------------------- per patient
def flair_lut(flair: np.ndarray) -> list[int]:
    """A 256-entry lookup table stretching a uint8 FLAIR volume between its 1st and 99.5th
    percentile (one scale for every slice), from a histogram of every other row and column."""
    sample = np.ascontiguousarray(flair[:, ::2, ::2]).ravel()
    cdf = np.cumsum(np.bincount(sample, minlength=256)) / max(sample.size, 1)
    lo, hi = (int(np.searchsorted(cdf, q)) for q in (0.01, 0.995))
    return np.clip((np.arange(256) - lo) * (255.0 / max(hi - lo, 1)), 0, 255).round().astype(np.uint8).tolist()


def _tile_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _encode_sprite(flair: np.ndarray, lut: list[int], tile: tuple[int, int], quality: int) -> bytes:
    """The FLAIR slices as one JPEG of tiles, ``SPRITE_COLUMNS`` per row, contrast by ``lut``."""
    import io

    from PIL import Image

    d = len(flair)
    cols = min(SPRITE_COLUMNS, d)
    rows = math.ceil(d / cols)
    th, tw = tile
    sheet = np.zeros((rows * th, cols * tw), dtype=np.uint8)
    for i, sl in enumerate(flair):
        im = sl if sl.shape == tile else np.asarray(Image.fromarray(np.ascontiguousarray(sl)).resize((tw, th), Image.BILINEAR))
        r, c = divmod(i, cols)
        sheet[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = im
    buf = io.BytesIO()
    Image.fromarray(sheet).point(lut).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _outlines(mask: np.ndarray | None) -> list[list[int]] | None:
    """Per slice, the flat pixel indices of the mask's 2D outline (empty slices: [])."""
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    d, h, w = mask.shape
    out: list[list[int]] = [[] for _ in range(d)]
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        ys, xs = np.flatnonzero(mask[z].any(axis=1)), np.flatnonzero(mask[z].any(axis=0))
        y0, y1, x0, x1 = max(ys[0] - 1, 0), min(ys[-1] + 2, h), max(xs[0] - 1, 0), min(xs[-1] + 2, w)
        # the outline within the mask's box (one pixel of margin) equals the whole slice's
        r, c = np.nonzero(border(mask[z, y0:y1, x0:x1]))
        out[z] = ((r + y0) * w + (c + x0)).tolist()
    return out


def write_patient_review(folder: Path, volume: PatientVolume, pred: np.ndarray, truth: np.ndarray | None,
                         report: dict) -> None:
    """Write ``review.html`` and ``review/`` (FLAIR sprite, thumbnail) into a patient's result folder."""
    from PIL import Image

    from segengine.engine.outputs.pictures import overlay_slice

    assets = folder / REVIEW_DIR
    assets.mkdir(exist_ok=True)
    d, h, w = pred.shape
    area = pred.reshape(d, -1).sum(axis=1)
    focus = int(np.argmax(area)) if area.any() else d // 2
    thumb = Image.fromarray(overlay_slice(volume.image[focus], pred[focus], None if truth is None else truth[focus]))
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    thumb.save(assets / "thumb.webp", "WEBP", quality=80, method=2)
    thumb_bytes = (assets / "thumb.webp").stat().st_size

    flair = volume.image[..., 1]
    lut = flair_lut(flair)
    tile = _tile_shape(h, w, TILE_MAX_SIDE)
    sprite = _encode_sprite(flair, lut, tile, quality=80)
    while len(sprite) + thumb_bytes > IMAGE_BUDGET_BYTES and max(tile) > 32:  # long or large volumes: smaller tiles
        shrink = math.sqrt((IMAGE_BUDGET_BYTES - thumb_bytes) * 0.85 / len(sprite))
        tile = _tile_shape(h, w, max(32, int(max(tile) * shrink)))
        sprite = _encode_sprite(flair, lut, tile, quality=70)
    (assets / "flair.jpg").write_bytes(sprite)

    data = {
        "slices": list(volume.slice_numbers), "height": h, "width": w,
        "tile": list(tile), "columns": min(SPRITE_COLUMNS, d), "sprite": f"{REVIEW_DIR}/flair.jpg", "focus": focus,
        "area": area.astype(int).tolist(), "pred": _outlines(pred), "truth": _outlines(truth),
        "truth_area": None if truth is None else np.asarray(truth, bool).reshape(d, -1).sum(axis=1).astype(int).tolist(),
    }
    # a script, not JSON: pages opened from file:// may load scripts but not fetch files
    (assets / VIEWER_DATA).write_text(f"window.SEGENGINE_VIEWER={_script_json(data)};\n", encoding="utf-8")
    (folder / PATIENT_PAGE).write_text(patient_html(volume.patient_id, report), encoding="utf-8")


def _script_json(obj) -> str:
    """JSON safe to inline in a <script> element."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else html.escape(str(value))


def patient_html(patient_id: str, report: dict) -> str:
    """A patient's page: facts and links from its report, the slice viewer over ``review/``."""
    pq = quote(patient_id)
    links = [(f"{pq}_mask.nii.gz", "mask NIfTI"), ("./", "mask tifs (this folder)"), ("report.json", "report.json"),
             ("overlay.png", "overlay sheet")]
    for extra, text in (((report.get("dicom") or {}).get("seg") or {}).get("file"), "DICOM SEG"), \
            ((report.get("probabilities") or {}).get("file"), "probability map"):
        if extra:
            links.append((quote(extra), text))
    source = report.get("input")
    if source:
        links.append((Path(source).resolve().as_uri(), "input" + (" NIfTI" if "nifti" in report else
                                                                    " DICOM study" if "dicom" in report else " folder")))
    link_html = " · ".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a>' for href, text in links)
    metrics = report.get("metrics") or {}
    facts = [("slices", _fmt(report.get("slices"))), ("tumor volume px", _fmt(report.get("tumor_volume_px"))),
             ("tumor volume mm³", _fmt(report.get("tumor_volume_mm3"), 1)), ("DSC", _fmt(metrics.get("dsc"))),
             (f"HD95 {html.escape(str(report.get('distance_unit', 'px')))}", _fmt(metrics.get("hd95"), 2)),
             ("backend", _fmt(report.get("backend")))]
    fact_html = "".join(f"<div><b>{k}</b> {v}</div>" for k, v in facts)
    review = _review_cell(report)
    if isinstance(report.get("review"), dict) and report["review"].get("note"):
        review += f'<div class="why">{html.escape(str(report["review"]["note"])[:SHOWN_CHARS])}</div>'
    return PATIENT_TEMPLATE.format(pid=html.escape(patient_id), links=link_html, facts=fact_html, review=review,
                                   has_truth="" if metrics else " hidden", data_src=f"{REVIEW_DIR}/{VIEWER_DATA}", style=STYLE,
                                   legend=legend_html())


# ---------------------------------------------------------------- the index
def _review_of(report: dict) -> tuple[bool | None, list[str]]:
    """(flag, or None when the report has no review or its mode no calibration; reasons and notes)."""
    review = report.get("review") if isinstance(report.get("review"), dict) else None
    flag = None if review is None or review.get("flag") is None else bool(review["flag"])
    reasons = [str(r)[:SHOWN_CHARS] for r in ((review or {}).get("reasons") or [])[:SHOWN_REASONS]]
    filled = (report.get("nifti") or {}).get("filled_with_flair") or []
    if filled and not ((review or {}).get("features") or {}).get("copied_channels"):  # else the estimate names them
        reasons.append(f"{' and '.join(str(f)[:20] for f in filled[:3])} filled with FLAIR")
    return flag, reasons


def _input_anomalies(report: dict) -> list[str]:
    """The input anomalies a report names (a sequence filled with FLAIR, intensities unlike the training
    patients'), in words with their number: a patient with one is never shown as plain "ok"."""
    from segengine.engine.postprocessing.quality import CHANNELS

    review = report.get("review") if isinstance(report.get("review"), dict) else {}
    features = review.get("features") if isinstance(review.get("features"), dict) else {}
    found = []
    copied = features.get("copied_channels")
    filled = [*((report.get("nifti") or {}).get("filled_with_flair") or []),
              *((report.get("dicom") or {}).get("filled_with_flair") or [])]
    if isinstance(copied, list) and copied:
        found.append(f"{' and '.join(str(c)[:20] for c in copied[:3])} copied from FLAIR")
    elif isinstance(filled, list) and filled:
        found.append(f"{' and '.join(str(f)[:20] for f in filled[:3])} filled with FLAIR")
    z, limit = features.get("intensity_z"), features.get("intensity_z_limit")
    limit = limit if _is_number(limit) else _flag_rules()[1]
    if _is_number(z) and z > limit:
        channel = features.get("intensity_z_channel")
        found.append(f"{channel if channel in CHANNELS else 'a channel'} intensity unlike the training patients' "
                     f"(robust z {z:.1f} > {limit:g})")
    return found


def _flag_rules() -> tuple[float, float, float | None]:
    """(expected DSC below which the flag is set, robust z beyond which the input's intensities are named
    (and flag), share of the tumor mass whose removal by post-processing flags, None where that rule is absent)."""
    from segengine.engine.postprocessing import quality

    return quality.FLAG_BELOW, float(getattr(quality, "INTENSITY_Z_FLAG", 3.0)), getattr(quality, "REMOVED_SHARE_FLAG", None)


def _explain(reason: str) -> str:
    """What a reason of the estimate means, in plain words (the reason itself carries the number)."""
    return next((why for key, why in REASON_EXPLANATIONS if key in reason),
                "a feature of this run that pulls the expected DSC down; the number is this patient's, the "
                "median the training patients'")


def _review_cell(report: dict) -> str:
    from segengine.engine.postprocessing.quality import summary_text

    FLAG_BELOW = _flag_rules()[0]
    flag, reasons = _review_of(report)
    review = report.get("review") if isinstance(report.get("review"), dict) else None
    proxy = str((review or {}).get("calibration") or "").startswith("proxy")  # no out-of-fold calibration: no green
    anomalies = _input_anomalies(report)
    expected = (review or {}).get("expected_dsc")
    expected = expected if _is_number(expected) else None
    if flag:
        tip = (f"flagged for review: the expected DSC {expected:.3f} is below {FLAG_BELOW:.2f}"
               if expected is not None and expected < FLAG_BELOW
               else "flagged for review whatever the estimate says: see the reasons below")
        label = _span("flag", "⚑ review", tip)
    elif anomalies:  # whatever the estimate says, the input itself is unusual: never plain "ok"
        label = _span("check", "⚠ check input", "the input is unusual (" + "; ".join(anomalies) + "): look at it before "
                      "trusting the mask or its estimate")
        if flag is None and review is not None:
            label += " " + _span("na", "uncalibrated", UNCALIBRATED_TIP)
    elif flag is None:
        label = _span("na", "—", "no quality estimate in this report") if review is None else \
            _span("na", "uncalibrated", UNCALIBRATED_TIP)
    elif proxy:
        label = _span("na", "not flagged (proxy)", PROXY_TIP)
    else:
        label = _span("ok", "ok", f"not flagged: expected DSC {expected:.3f} is at or above {FLAG_BELOW:.2f} and "
                      "nothing unusual was found in the input" if expected is not None else
                      f"not flagged: expected DSC at or above {FLAG_BELOW:.2f}")
    estimate = summary_text({**review, "reasons": [], "flag": False}) if review else ""
    if estimate and expected is not None:
        label += " " + _span("est", estimate, ESTIMATE_TIP)
    shown = list(reasons)
    for a in anomalies:  # the anomaly in words with its number, unless a reason already says it
        words = ("intensity",) if "intensity" in a else ("copy of FLAIR", "copies of FLAIR", "with FLAIR", "from FLAIR")
        if not any(w in r for r in shown for w in words):
            shown.append(a)
    return label + "".join(f'<div class="why" title="{html.escape(_explain(r))}">{html.escape(r)}</div>' for r in shown)


def _span(cls: str, text: str, tip: str) -> str:
    return f'<span class="{cls}" title="{html.escape(tip)}">{html.escape(text)}</span>'


ESTIMATE_TIP = ("expected DSC: the Dice overlap (0 = none, 1 = perfect) this mask would most likely score against an "
                "expert's outline, estimated from the run itself (the model's confidence, the mask's size and shape, "
                "what post-processing removed, the input's intensities) by a regression fitted on cross-validation "
                "patients the model never trained on; no ground truth is needed. 90% interval: for 90% of those "
                "patients the true DSC fell within this range around the estimate")


UNCALIBRATED_TIP = "no quality calibration for this model and mode: no estimate and no flag, which is not an ok"


PROXY_TIP = ("not flagged, but the estimate is calibrated on a proxy (not out-of-fold patients): treat it as a hint, "
             "not an ok")


# (words a reason of quality.assess contains, what it means): shown as the reason's tooltip
REASON_EXPLANATIONS = (
    ("copy of FLAIR", "the input lacks this sequence and FLAIR stands in for it (as the reader fills a missing one); "
                      "the model learned from three real sequences, so its mask is less reliable"),
    ("copies of FLAIR", "the input lacks these sequences and FLAIR stands in for them; the model learned from three "
                        "real sequences, so its mask is less reliable"),
    ("copied from FLAIR", "the input lacks this sequence and FLAIR stands in for it"),
    ("filled with FLAIR", "the input lacks this sequence and FLAIR stands in for it"),
    ("intensity", "the input's brightness is far from the training patients' (robust z: how many typical deviations "
                  "away; above 3 is unusual): another scanner, protocol or preprocessing"),
    ("no tumor found", "the mask is empty: if the patient has a lesion, the model missed it"),
    ("mean probability inside the mask", "how sure the model is of the voxels it marked (1 = certain); low "
                                         "confidence goes with low DSC"),
    ("is confident", "the share of marked voxels the model gives a probability above 0.9"),
    ("mask of", "the mask's size: small masks lose DSC quickly to a few wrong voxels"),
    ("uncertain margin", "voxels the model is unsure about (probability 0.2 to 0.8) relative to the mask's size: a "
                         "fuzzy boundary"),
    ("post-processing removed", "probable tumor that the component step discarded: the model also saw other "
                                "candidate regions"),
    ("candidate regions", "separate regions above the threshold before post-processing: a fragmented prediction"),
    ("views disagree", "accurate mode: how much the averaged models or mirrored views disagree with their mean"),
    ("example flag", "a flag set by hand or by a test"),
)


def legend_html() -> str:
    """What the review column says, for the index and the patient pages."""
    FLAG_BELOW, z_limit, removed = _flag_rules()
    from segengine.engine.postprocessing.quality import CONTRAST_Z_FLAG

    anomalies = (f"input intensities more than {z_limit:g} robust z from the training patients' (a plan v2 model "
                 f"compares each sequence's contrast: {CONTRAST_Z_FLAG:g})") + (
        f", or post-processing removing more than {removed:.0%} of the probable tumor mass" if removed else "")
    items = [
        ("expected DSC", ESTIMATE_TIP.split(". 90% interval")[0].replace("expected DSC: ", "") + "."),
        ("90% interval", "for 90% of the calibration patients the true DSC fell within this range around the "
                         "estimate; a wide interval is an uncertain estimate."),
        ("⚑ review", f"the flag: set when the expected DSC is below {FLAG_BELOW:.2f}, and whatever the estimate "
                     f"for {anomalies}. The lines under it are the reasons, each with this patient's number and "
                     "the training patients' median (or the limit it crossed)."),
        ("⚠ check input", "the input itself is unusual (a sequence filled with FLAIR, intensities far from the "
                          "training patients'): check it before trusting the mask, whatever the estimate says."),
        ("ok", f"expected DSC at or above {FLAG_BELOW:.2f} and nothing unusual in the input."),
        ("not flagged (proxy)", "not flagged, but calibrated on a proxy rather than out-of-fold patients."),
        ("uncalibrated", "no calibration for this model and mode: no estimate, no flag."),
        ("DSC, HD95", "measured against the ground truth, only for patients that came with it."),
    ]
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
    return (f'<details class="legend" id="legend"><summary>How to read the review column (hover a label or '
            f'reason for more)</summary><dl>{rows}</dl></details>')


REPORT_MAX_BYTES = 1 << 20  # a 512-slice report is ~20 kB; a larger report.json is not read (nor put on a page)


SHOWN_REASONS, SHOWN_CHARS = 10, 300  # what one report may put on a page: pages stay bounded too


_NUMBER = (int, float)


# report.json fields the pages show: expected type when present (None allowed where listed)
REPORT_SCHEMA = {"patient": (str,), "input": (str,), "slices": (int,), "tumor_volume_px": (int,),
                 "tumor_volume_mm3": (*_NUMBER, type(None)), "tumor_slices": (list,), "backend": (str,),
                 "metrics": (dict, type(None)), "review": (dict, type(None)), "nifti": (dict, type(None))}


def _is_number(value) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _check_estimate(review: dict) -> str | None:
    """The quality estimate's fields as quality.summary_text and the pages use them (numbers
    formatted with :.3f, the features read as a dict), None when they can be shown."""
    dsc, interval = review.get("expected_dsc"), review.get("interval")
    if dsc is not None and not _is_number(dsc):
        return f"review.expected_dsc is {type(dsc).__name__}"
    if interval is not None and not (isinstance(interval, list) and len(interval) == 2
                                     and all(map(_is_number, interval))):
        return "review.interval is not two numbers"
    if not isinstance(review.get("flag"), (bool, type(None))):
        return f"review.flag is {type(review['flag']).__name__}"
    if not isinstance(review.get("features"), (dict, type(None))) or \
            not isinstance(review.get("calibration"), (str, type(None))):
        return "review.features/calibration of the wrong type"
    return None


def check_report(rep) -> str | None:
    """Why a report read back from OUT cannot be shown (None when it can): the fields the pages
    use, by type, so a hand-edited or planted report.json is "unreadable", not a crash."""
    if not isinstance(rep, dict):
        return f"not an object ({type(rep).__name__})"
    for key, types in REPORT_SCHEMA.items():
        if key in rep and (not isinstance(rep[key], types) or isinstance(rep[key], bool)):
            return f"{key} is {type(rep[key]).__name__}"
    for key in ("dsc", "hd95"):
        v = (rep.get("metrics") or {}).get(key)
        if v is not None and (not isinstance(v, _NUMBER) or isinstance(v, bool)):
            return f"metrics.{key} is {type(v).__name__}"
    review = rep.get("review") or {}
    if not isinstance(review.get("reasons") or [], list) or not isinstance(review.get("note") or "", str):
        return "review.reasons/note of the wrong type"
    why = _check_estimate(review)
    if why:
        return why
    if not isinstance((rep.get("nifti") or {}).get("filled_with_flair") or [], list):
        return "nifti.filled_with_flair is not a list"
    for where in (("probabilities",), ("dicom",), ("dicom", "seg")):  # the files patient_html links
        node = rep
        for key in where:
            node = node.get(key) or {}
            if not isinstance(node, dict):
                return f"{'.'.join(where)} is {type(node).__name__}"
        if not isinstance(node.get("file") or "", str):
            return f"{'.'.join(where)}.file is {type(node['file']).__name__}"
    if len(rep.get("input") or "") > 4096:
        return "input path longer than 4096 characters"
    return None


def collect_reports(out: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """(patient folder name, report) for every complete result in OUT, and the unreadable ones.

    Result folders are real folders (a link planted in OUT is not followed: fsguard), each
    report.json a regular file of at most REPORT_MAX_BYTES, schema-checked."""
    from segengine.engine.core.errors import DataError
    from segengine.engine.core.fsguard import entry_kind, read_regular

    rows, bad = [], []
    for folder in sorted(p for p in out.iterdir() if not p.name.startswith(".")):
        try:  # a patient folder this user cannot read is listed as unreadable, not a traceback
            kind = entry_kind(folder)
            if kind == "link" and (folder / "report.json").exists():
                bad.append(f"{folder.name}: a symbolic link, not a result folder (not followed)")
            if kind != "dir" or entry_kind(folder / "report.json") == "missing":
                continue
        except OSError as exc:
            bad.append(f"{folder.name}: cannot be read ({exc.strerror or exc})")
            continue
        path = folder / "report.json"
        try:
            rep = json.loads(read_regular(path, "report", REPORT_MAX_BYTES, follow=False).decode("utf-8"))
            why = check_report(rep)
            if why:
                raise ValueError(why)
        except (DataError, ValueError, RecursionError) as exc:
            bad.append(f"{folder.name}: {str(exc).replace(str(path) + ': ', '')}")
            continue
        rows.append((folder.name, rep))
    return rows, bad


def _num(value) -> str:
    """A data-sort value: numbers sort numerically, missing values last."""
    return "" if value is None else repr(float(value))


def _refresh_patient_page(out: Path, name: str, report: dict) -> None:
    """Re-render OUT/<name>/review.html under the patient's lock, as every write into OUT/<id> is."""
    from segengine.engine.core.fsguard import entry_kind
    from segengine.engine.outputs.results_dir import PatientLock

    try:
        with PatientLock(out, name):
            if entry_kind(out / name) == "dir":  # never a page written through a link planted in OUT
                write_text_atomic(out / name / PATIENT_PAGE, patient_html(name, report))
    except OSError:  # PatientBusyError: a concurrent run is replacing it (its own page is fresh); or not writable
        pass


def index_html(out: Path, refresh_patients: bool = True) -> tuple[str, int, int]:
    """The index page's HTML, the number of patients and of flagged patients.

    With ``refresh_patients`` each patient's page is re-rendered from its current report.
    """
    rows, bad = collect_reports(out)
    body, flagged, dscs, notes = [], 0, [], set()
    for name, rep in rows:
        if isinstance(rep.get("review"), dict) and rep["review"].get("note"):
            notes.add(str(rep["review"]["note"])[:SHOWN_CHARS])  # e.g. "no calibrated review rules": once, not per row
        q = quote(name)
        flag, _ = _review_of(rep)
        flagged += bool(flag)
        metrics = rep.get("metrics") or {}
        if metrics.get("dsc") is not None:
            dscs.append(metrics["dsc"])
        has_page = (out / name / REVIEW_DIR / VIEWER_DATA).is_file()
        if has_page and refresh_patients:  # the report may have changed since (a review step, a hand edit)
            _refresh_patient_page(out, name, rep)
        thumb = f"{q}/{REVIEW_DIR}/thumb.webp" if (out / name / REVIEW_DIR / "thumb.webp").is_file() else f"{q}/overlay.png"
        target = f"{q}/{PATIENT_PAGE}" if has_page else f"{q}/report.json"
        cells = [
            (f'<a href="{target}"><img src="{thumb}" loading="lazy" width="{THUMB_SIDE}" height="{THUMB_SIDE}" alt=""></a>', ""),
            (f'<a href="{target}">{html.escape(name)}</a>', html.escape(name.lower())),
            (_fmt(rep.get("slices")), _num(rep.get("slices"))),
            (_fmt(len(rep.get("tumor_slices") or [])), _num(len(rep.get("tumor_slices") or []))),
            (_fmt(rep.get("tumor_volume_px")), _num(rep.get("tumor_volume_px"))),
            (_fmt(rep.get("tumor_volume_mm3"), 1), _num(rep.get("tumor_volume_mm3"))),
            (_review_cell(rep), {None: "", True: "1", False: "0"}[flag]),
            (_fmt(metrics.get("dsc")), _num(metrics.get("dsc"))),
            (_fmt(metrics.get("hd95"), 2) + (f" {html.escape(str(rep.get('distance_unit', 'px')))}"
                                             if metrics.get("hd95") is not None
                                             else ""), _num(metrics.get("hd95"))),
            (_fmt(rep.get("backend")), html.escape(str(rep.get("backend", "")))),
        ]
        tds = "".join(f'<td data-sort="{s}">{c}</td>' for c, s in cells)
        body.append(f'<tr data-patient="{html.escape(name.lower())}" data-flag="{int(bool(flag))}">{tds}</tr>')
    summary = f"{len(rows)} patients · {flagged} flagged for review"
    if dscs:
        summary += f" · mean DSC {np.mean(dscs):.4f} over {len(dscs)} with ground truth"
    if notes:
        summary += " · review: " + html.escape("; ".join(sorted(notes)))
    if bad:
        summary += f" · {len(bad)} unreadable report(s): " + html.escape("; ".join(bad[:5]))
    page = INDEX_TEMPLATE.format(title=html.escape(out.resolve().name), summary=summary, rows="\n".join(body),
                                 style=STYLE, legend=legend_html())
    return page, len(rows), flagged


def write_index(out: str | os.PathLike, refresh_patients: bool = True) -> tuple[Path, int, int]:
    """Write OUT/index.html atomically (temp file + rename); returns (path, patients, flagged)."""
    out = Path(out)
    page, n, flagged = index_html(out, refresh_patients)
    write_text_atomic(out / INDEX_PAGE, page)
    return out / INDEX_PAGE, n, flagged


# ---------------------------------------------------------------- templates (no network: all inline)
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:.2em 0}.summary{color:#555;margin-bottom:.8em}
.controls{display:flex;gap:1.2em;align-items:center;margin:.6em 0}
table{border-collapse:collapse;background:#fff}th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:middle}
th{cursor:pointer;user-select:none;background:#eee;position:sticky;top:0}th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"}td:nth-child(2),td:nth-child(7),th:nth-child(2),th:nth-child(7){text-align:left}
img{display:block;background:#000}.flag{color:#b00;font-weight:600}.ok{color:#080}.na{color:#999}
.why{color:#666;font-size:.85em;max-width:22em}tr.hidden{display:none}
.viewer{position:relative;display:inline-block}.viewer canvas{width:512px;height:auto;display:block}
#outlines{position:absolute;left:0;top:0;image-rendering:pixelated}.facts{display:flex;flex-wrap:wrap;gap:.4em 1.4em;margin:.6em 0}
.hidden{display:none}label{user-select:none}#slider{width:22em}#label{margin:.3em 0}
.legend-pred{color:#c77f00}.legend-truth{color:#2b8fcf}.check{color:#a65e00;font-weight:600}
.legend{margin:.4em 0 .8em;max-width:60em;color:#444}.legend summary{cursor:pointer}
.legend dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;margin:.4em 0}.legend dt{font-weight:600}
.legend dd{margin:0}[title]{cursor:help}
"""


INDEX_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>segengine review: {title}</title>
<link rel="icon" href="data:,"><style>{style}</style></head>
<body><h1>segengine review: {title}</h1>
<div class="summary" id="summary">{summary}</div>
{legend}
<div class="controls"><label>filter <input id="filter" type="search" placeholder="patient id"></label>
<label><input id="flagged" type="checkbox"> flagged only</label><span id="shown"></span></div>
<table id="patients"><thead><tr><th data-type="none">overlay</th><th>patient</th><th>slices</th><th>tumor slices</th>
<th>tumor volume px</th><th>tumor volume mm³</th><th title="the quality estimate and the flag: see How to read the review column">review</th><th>DSC</th><th>HD95 (px or mm)</th><th>backend</th></tr></thead>
<tbody>
{rows}
</tbody></table>
<script>
(function(){{
  const tbody=document.querySelector("#patients tbody"), rows=Array.from(tbody.rows);
  const filter=document.getElementById("filter"), flagged=document.getElementById("flagged"), shown=document.getElementById("shown");
  function apply(){{
    const q=filter.value.trim().toLowerCase(); let n=0;
    for(const r of rows){{const ok=(!q||r.dataset.patient.includes(q))&&(!flagged.checked||r.dataset.flag==="1");
      r.classList.toggle("hidden",!ok); n+=ok;}}
    shown.textContent=n+" of "+rows.length+" shown";
  }}
  filter.addEventListener("input",apply); flagged.addEventListener("change",apply);
  document.querySelectorAll("#patients th").forEach((th,col)=>{{
    if(th.dataset.type==="none")return;
    th.addEventListener("click",()=>{{
      const dir=th.getAttribute("aria-sort")==="ascending"?-1:1;
      document.querySelectorAll("#patients th").forEach(h=>h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort",dir>0?"ascending":"descending");
      const key=r=>r.cells[col].dataset.sort;
      rows.sort((a,b)=>{{const x=key(a),y=key(b);if(x===y)return 0;if(x==="")return 1;if(y==="")return -1;
        const nx=parseFloat(x),ny=parseFloat(y);
        return (isNaN(nx)||isNaN(ny)?(x<y?-1:1):(nx-ny))*dir;}});
      rows.forEach(r=>tbody.appendChild(r));
    }});
  }});
  apply();
}})();
</script></body></html>
"""


PATIENT_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>segengine review: {pid}</title>
<link rel="icon" href="data:,"><style>{style}</style></head>
<body><div><a href="../index.html">← all patients</a></div>
<h1>{pid}</h1><div class="facts">{facts}<div><b>review</b> {review}</div></div>
{legend}
<div class="links">{links}</div>
<div class="controls"><input id="slider" type="range" min="0" step="1" aria-label="slice">
<label class="legend-pred" title="orange: the outline of the predicted mask"><input id="show-pred" type="checkbox" checked> predicted (orange)</label>
<label class="legend-truth{has_truth}" title="sky blue: the outline of the ground truth"><input id="show-truth" type="checkbox" checked> ground truth (blue)</label>
<span class="why">←/→ or ↑/↓ change the slice</span></div>
<div id="label"></div>
<div class="viewer"><canvas id="flair"></canvas><canvas id="outlines"></canvas></div>
<script src="{data_src}"></script>
<script>
(function(){{
  const D=window.SEGENGINE_VIEWER;
  const flair=document.getElementById("flair"), over=document.getElementById("outlines");
  const slider=document.getElementById("slider"), label=document.getElementById("label");
  const showPred=document.getElementById("show-pred"), showTruth=document.getElementById("show-truth");
  for(const c of [flair,over]){{c.width=D.width;c.height=D.height;}}
  over.style.width=flair.style.width="512px";
  slider.max=D.slices.length-1; slider.value=D.focus;
  const sprite=new Image(); sprite.src=D.sprite;
  function draw(){{
    const i=+slider.value, th=D.tile[0], tw=D.tile[1], r=Math.floor(i/D.columns), c=i%D.columns;
    const ctx=flair.getContext("2d"); ctx.fillStyle="#000"; ctx.fillRect(0,0,D.width,D.height);
    if(sprite.complete&&sprite.naturalWidth)ctx.drawImage(sprite,c*tw,r*th,tw,th,0,0,D.width,D.height);
    const img=new ImageData(D.width,D.height);
    const paint=(idx,rgb)=>{{for(const p of idx){{const k=4*p;img.data[k]=rgb[0];img.data[k+1]=rgb[1];img.data[k+2]=rgb[2];img.data[k+3]=255;}}}};
    if(D.truth&&showTruth.checked)paint(D.truth[i],[86,180,233]);
    if(showPred.checked)paint(D.pred[i],[230,159,0]);
    over.getContext("2d").putImageData(img,0,0);
    let text="slice "+D.slices[i]+" ("+(i+1)+" of "+D.slices.length+") · predicted "+D.area[i]+" px";
    if(D.truth_area)text+=" · ground truth "+D.truth_area[i]+" px";
    label.textContent=text; flair.dataset.slice=D.slices[i];
  }}
  sprite.onload=draw; slider.addEventListener("input",draw);
  showPred.addEventListener("change",draw); showTruth.addEventListener("change",draw);
  document.addEventListener("keydown",e=>{{
    const step={{ArrowRight:1,ArrowUp:1,ArrowLeft:-1,ArrowDown:-1}}[e.key];
    if(!step||e.target===slider)return;
    slider.value=Math.min(+slider.max,Math.max(0,+slider.value+step)); draw(); e.preventDefault();
  }});
  draw();
}})();
</script></body></html>
"""


def rewrite_index(out: Path) -> tuple[Path, int, int]:
    """`segengine report`: OUT/index.html of a results folder, refused (one line) for a folder
    that holds no results (e.g. the inputs: nothing is written there)."""
    if not out.is_dir():
        raise NotAFolderError(f"{out}: no such folder" if not out.exists() else f"{out}: not a folder")
    try:
        found = collect_reports(out)
    except OSError as exc:  # OUT itself cannot be listed
        raise OutputError(f"{out}: cannot read the folder ({exc.strerror or exc})") from None
    if found == ([], []):
        raise NoSlicesError(f"{out}: no patient results (OUT/<patient>/report.json) in this folder; nothing written")
    try:
        return write_index(out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the review page ({exc.strerror or exc})") from None
