"""Cross-validation: the fold rule, its files, and a tiny real CV run scored out of fold."""
from __future__ import annotations

import json

import pytest

from conftest import SPLITS, TRAIN_PATIENT, VAL_PATIENTS
from segengine.engine.readers.volume import read_patient_list
from segengine.train import cv, folds


@pytest.mark.parametrize("n_folds", [2, 3, 5, 10])
def test_folds_partition_the_train_list_and_spread_every_site(n_folds):
    patients = sorted(read_patient_list(SPLITS / "train.txt"))
    split = folds.make_folds(patients, n_folds, seed=0)
    flat = [p for f in split for p in f]
    assert sorted(flat) == patients  # every patient exactly once
    sizes = [len(f) for f in split]
    assert max(sizes) - min(sizes) <= 1
    sites = {p.split("_")[1] for p in patients}
    for site in sites:
        count = sum(p.split("_")[1] == site for p in patients)
        per_fold = [sum(p.split("_")[1] == site for p in f) for f in split]
        assert max(per_fold) - min(per_fold) <= 1, (site, per_fold)  # sites dealt evenly
        assert sum(per_fold) == count
    assert folds.make_folds(patients, n_folds, seed=0) == split
    assert folds.make_folds(patients, n_folds, seed=1) != split


def test_committed_fold_files_are_what_the_rule_gives():
    patients = sorted(read_patient_list(SPLITS / "train.txt"))
    expected = folds.make_folds(patients, 5, folds.DEFAULT_FOLD_SEED)
    d = folds.fold_dir(5, folds.DEFAULT_FOLD_SEED)
    stored = [sorted(read_patient_list(d / f"fold{k}.txt")) for k in range(5)]
    assert stored == expected
    assert not set(stored[0]) & set(read_patient_list(SPLITS / "reference_validation.txt"))


@pytest.mark.parametrize("case", ["changed_list", "missing_file", "bad_fold", "too_many_folds"])
def test_fold_errors(case, tmp_path):
    train_list = tmp_path / "train.txt"
    train_list.write_text("\n".join(f"TCGA_XX_{i:04d}_2000" for i in range(6)) + "\n")
    folds.load_or_write_folds(train_list, 3, root=tmp_path / "folds")
    with pytest.raises(folds.FoldError):
        if case == "changed_list":
            train_list.write_text("\n".join(f"TCGA_XX_{i:04d}_2000" for i in range(7)) + "\n")
            folds.load_or_write_folds(train_list, 3, root=tmp_path / "folds")
        elif case == "missing_file":
            (folds.fold_dir(3, root=tmp_path / "folds") / "fold1.txt").unlink()
            folds.load_or_write_folds(train_list, 3, root=tmp_path / "folds")
        elif case == "bad_fold":
            folds.split_for_fold(train_list, 3, 3)
        else:
            folds.make_folds(read_patient_list(train_list), 7)


def test_tiny_cv_run_trains_scores_out_of_fold_and_compares(kaggle_root, tmp_path, monkeypatch):
    """Two folds of a tiny 2.5D network on three real patients: every patient is scored
    exactly once, by the model that did not train on it, with the engine's metrics."""
    data = tmp_path / "data"
    data.mkdir()
    patients = VAL_PATIENTS + [TRAIN_PATIENT]
    for p in patients:
        (data / p).symlink_to(kaggle_root / p)
    (data / "splits").mkdir()
    (data / "splits" / "train.txt").write_text("\n".join(patients) + "\n")
    monkeypatch.setattr(folds, "FOLDS_DIR", tmp_path / "folds")
    train_args = ["--steps", "2", "--epoch-steps", "2", "--batch-size", "2", "--base-channels", "4", "--context-slices", "1",
                  "--threads", "1", "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "cv" / "tiny"
    assert cv.main(["--data", str(data), "--out", str(out), "--folds", "2", "--threads", "1",
                    "--record", str(tmp_path / "tiny.json"), "--", *train_args]) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    split = folds.load_or_write_folds(data / "splits" / "train.txt", 2)
    for variant in ("native_lcc", "native_lcc_fill2d", "native_none", "native_lcc_tta", "reference_lcc"):
        per_patient = result["variants"][variant]["per_patient"]
        assert sorted(per_patient) == sorted(patients)
        for k, held_out in enumerate(split):
            assert all(per_patient[p]["fold"] == k for p in held_out)
    # the stored probabilities reproduce the recorded native score
    import numpy as np

    from segengine.engine.readers.registry import read_patient
    from segengine.engine.evaluation.metrics import dsc
    from segengine.engine.postprocessing.postprocess import PostprocessConfig, postprocess

    p = split[0][0]
    prob = np.load(out / "fold0" / "oof" / f"{p}.npz")["prob"].astype(np.float32)
    truth = read_patient(data / p).mask > 0
    assert dsc(postprocess(prob, PostprocessConfig()), truth) == pytest.approx(
        result["variants"]["native_lcc"]["per_patient"][p]["dsc"], abs=2e-3)  # float16 storage
    # fold models carry cards that verify, name their held-out fold and the 2.5D input width
    card = json.loads((out / "fold1" / "model" / "tiny_fold1.json").read_text())
    assert card["context_slices"] == 1 and card["architecture"]["in_channels"] == 9
    assert "fold 1" in card["training"]["data_split"]["held_out"] or "fold1" in card["training"]["data_split"]["held_out"]
    card_file = out / "fold0" / "model" / "tiny_fold0.json"
    assert cv.main(["--data", str(data), "--out", str(out), "--folds", "2", "--score-only", "--card", str(card_file)]) == 0
    summary = json.loads(card_file.read_text())["cross_validation"]["protocols"]["native_lcc"]
    dscs = [r["dsc"] for r in result["variants"]["native_lcc"]["per_patient"].values()]
    assert summary["patients"] == len(patients) and summary["min"] == pytest.approx(min(dscs), abs=1e-4)
    assert summary["below_0.70"] == sum(d < 0.70 for d in dscs)
    rows = cv.flair_only_scores(out, data, 0, threads=1)
    assert [r[0] for r in rows] == split[0]
    for patient, given, _ in rows:  # the "as given" column is the recorded out-of-fold score
        assert given == pytest.approx(result["variants"]["native_lcc"]["per_patient"][patient]["dsc"], abs=1e-6)
    png = tmp_path / "worst.png"
    worst = cv.worst_cases_figure(out, data, png, n=2)
    dscs_sorted = sorted(result["variants"]["native_lcc"]["per_patient"].items(), key=lambda kv: kv[1]["dsc"])
    assert worst == [p for p, _ in dscs_sorted[:2]] and png.stat().st_size > 1000
    # `cv compare` of this result with a copy that scores the worst patient 0.09 higher (and one
    # patient fewer): the mean difference over the 2 patients in common is 0.045 by hand
    better = json.loads(json.dumps(result))
    better["recipe"] = "better"
    scored = better["variants"]["native_lcc"]["per_patient"]
    del scored[dscs_sorted[-1][0]]
    scored[worst[0]]["dsc"] += 0.09
    text = cv.compare(result, better)
    assert "2 patients in common" in text and "mean +0.0450" in text and "better on 1, worse on 0" in text, text
    assert f"largest |difference|: {worst[0]} +0.09000" in text
    # the fold models ship as an ensemble: float16 members that verify and predict like the fold models
    models = tmp_path / "models"
    assert cv.main(["--data", str(data), "--out", str(out), "--folds", "2", "--score-only",
                    "--ship-ensemble", "tinyens", "--models-dir", str(models)]) == 0
    from segengine.engine.inference.backends.torch_backend import TorchBackend
    from segengine.engine.inference.ensemble import load_ensemble
    from segengine.engine.model.spec import load_model_spec
    from segengine.engine.inference.predict import model_input
    from segengine.engine.preprocessing.preprocess import preprocess_patient

    plan = load_ensemble(models / "tinyens.ensemble.json")
    assert [m.name for m in plan.members] == ["tinyens_fold0", "tinyens_fold1"]
    assert plan.card["cross_validation"]["protocols"]["native_lcc"]["patients"] == len(patients)
    vol = read_patient(data / p)
    for k, member in enumerate(plan.members):
        import torch

        state = torch.load(member.weights, weights_only=True)["state_dict"]
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
        x = model_input(preprocess_patient(vol, "native", member.preprocessing), member)[:4]
        with TorchBackend(member, threads=1) as a, TorchBackend(load_model_spec(out / f"fold{k}" / "model" / f"tiny_fold{k}.pt"), threads=1) as b:
            np.testing.assert_allclose(a.predict(x), b.predict(x), atol=2e-2)
    # out-of-fold probabilities again from the shipped members alone: each patient by the member
    # whose card names its fold; then the component rule and the quality calibration on them
    rescored = tmp_path / "rescored"
    assert cv.main(["rescore", str(models / "tinyens.ensemble.json"), "--out", str(rescored), "--data", str(data),
                    "--folds", "2", "--threads", "1", "--native-only"]) == 0
    again = json.loads((rescored / "cv.json").read_text())["variants"]["native_lcc"]["per_patient"]
    assert {q: r["fold"] for q, r in again.items()} == {q: k for k, held in enumerate(split) for q in held}
    assert cv.main(["component-rule", str(rescored), "--data", str(data), "--record", str(tmp_path / "rule.json")]) == 0
    assert len(json.loads((tmp_path / "rule.json").read_text())["per_patient"]) == len(patients)
    card_copy = tmp_path / "card_copy.json"
    card_copy.write_text(card_file.read_text())
    assert cv.main(["calibrate-review", str(rescored), "--data", str(data), "--write-card", str(card_copy),
                    "--record", str(tmp_path / "quality.json")]) == 0
    review = json.loads(card_copy.read_text())["review"]
    assert sorted(review["modes"]) == ["single", "tta"] and review["input_reference"]["patients"] == len(patients)
    assert json.loads((tmp_path / "quality.json").read_text())["modes"]["single"]["leave_one_fold_out"]["patients"] == 3
    with pytest.raises(SystemExit, match="needs all 3 folds"):
        cv.main(["--data", str(data), "--out", str(out), "--folds", "3", "--only", "0,1", "--score-only",
                 "--ship-ensemble", "x", "--models-dir", str(models)])


@pytest.mark.parametrize("context", [0, 1, 2])
def test_training_neighbours_match_what_inference_stacks(context):
    """context_index over concatenated patients (training) == stack_context per patient (inference)."""
    import numpy as np

    from segengine.engine.preprocessing.preprocess import stack_context
    from segengine.engine.preprocessing.preprocess import context_index

    sizes = [1, 4, 2, 5]
    patient_index = np.repeat(np.arange(len(sizes)), sizes)
    images = np.random.default_rng(0).standard_normal((len(patient_index), 3, 4, 4)).astype(np.float32)
    trained = images[context_index(patient_index, context)].reshape(len(images), -1, 4, 4)
    inferred = np.concatenate([stack_context(images[patient_index == i], context) for i in range(len(sizes))])
    assert trained.shape == (len(images), 3 * (2 * context + 1), 4, 4)
    np.testing.assert_array_equal(trained, inferred)


def test_segengine_cv_passes_the_options_after_double_dash_to_training(tmp_path, monkeypatch):
    """Click consumes the "--" of `segengine cv ... -- --steps N`; the options must still reach train."""
    from click.testing import CliRunner

    from segengine.engine.cli import main

    seen = []
    monkeypatch.setattr(cv, "train_fold", lambda data, out, n, k, seed, train_args: seen.append(train_args) or False)
    res = CliRunner().invoke(main, ["cv", "--data", str(SPLITS.parent), "--out", str(tmp_path / "run"), "--only", "0",
                                    "--", "--steps", "7", "--epoch-steps", "7"])
    assert seen == [["--steps", "7", "--epoch-steps", "7"]], res.output
    assert "fold 0 stopped before its last step" in res.output and res.exit_code == 1


def test_fold_placeholder_in_training_options_names_each_fold(tmp_path, monkeypatch):
    """`--init-from m_fold{fold}.pt` must start fold k from the fold-k model, which never saw fold k's patients."""
    from segengine.train import train as train_module

    seen = []
    monkeypatch.setattr(train_module, "main", lambda args: seen.append(args))
    for k in (1, 3):
        cv.train_fold(SPLITS.parent, tmp_path / "run", 5, k, 0, ["--init-from", "m_fold{fold}.pt", "--steps", "7"])
    assert [a[a.index("--init-from") + 1] for a in seen] == ["m_fold1.pt", "m_fold3.pt"]
    assert [a[a.index("--fold") + 1] for a in seen] == ["1", "3"]


def test_failure_kind_table_reads_each_group_before_and_after():
    """Hand-computed: two of the missed tumors, an unnamed patient that drops below 0.70, one that stays good."""
    from segengine.train.paired import by_failure_kind

    def result(name, scores):
        return {"recipe": name, "variants": {"native_lcc": {"per_patient": {p: {"dsc": d} for p, d in scores.items()}}}}

    before = result("old", {"TCGA_DU_7306_19930512": 0.1, "TCGA_DU_7018_19911220": 0.3, "TCGA_XX_0001_2000": 0.8,
                            "TCGA_XX_0002_2000": 0.9})
    after = result("new", {"TCGA_DU_7306_19930512": 0.5, "TCGA_DU_7018_19911220": 0.6, "TCGA_XX_0001_2000": 0.6,
                           "TCGA_XX_0002_2000": 0.95})
    lines = by_failure_kind(before, after).splitlines()
    missed = [r for r in lines if r.startswith("| missed tumor |")]
    assert missed == ["| missed tumor | DU_7306 0.100 -> 0.500, DU_7018 0.300 -> 0.600 | 0.200 | 0.550 | +0.350 |"]
    assert [r for r in lines if r.startswith("| other")] == [
        "| other, below 0.70 in either | XX_0001 0.800 -> 0.600 | 0.800 | 0.600 | -0.200 |"]
    assert lines[-1] == "| patients below 0.70 | of 4 | 2 | 3 | +1 |"  # 0.5, 0.6, 0.6 after
    assert not any("dark FLAIR" in r or "XX_0002" in r for r in lines)  # absent groups and good patients left out
