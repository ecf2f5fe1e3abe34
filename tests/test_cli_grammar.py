"""One CLI grammar (issue 31): --patients is a folder of patients everywhere (bench counts with
--num-patients), --model is a PATH everywhere, export --kinds names the backends, and `segengine
train` / `segengine cv` are Click commands whose --help documents every option while the arguments
still reach the parsers of record (train/train.py, train/cv.py) exactly as given. No model runs here:
the work each command would start is replaced by a recorder."""
from __future__ import annotations

import argparse
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from segengine.engine.cli import main
from segengine.engine.core.errors import DataError, ExportError


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="segengine")


def _click_params(command: click.Command) -> dict[str, click.Option]:
    return {o: p for p in command.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")}


def _argparse_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def _grab_parser(monkeypatch, method: str, call) -> argparse.ArgumentParser:
    """The argparse parser that ``call`` builds, caught at its parse call (before any work)."""
    grabbed = []

    def grab(self, *args, **kwargs):
        grabbed.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, method, grab)
    with pytest.raises(SystemExit):
        call()
    return grabbed[-1]


def _train_parser(monkeypatch):
    from segengine.train import train

    return _grab_parser(monkeypatch, "parse_args", lambda: train.parse_args([]))


def _cv_parser(monkeypatch):
    from segengine.train import cv

    return _grab_parser(monkeypatch, "parse_known_args", lambda: cv._main(["--out", "unused"]))


# ------------------------------------------------------------------ train and cv: Click over the parsers of record
@pytest.mark.parametrize("name, parser_of", [("train", _train_parser), ("cv", _cv_parser)])
def test_click_options_mirror_the_parser_of_record(monkeypatch, name, parser_of):
    """Every option of train/train.py's (cv.py's) parser is a documented Click option with its default
    and choices; an option added there fails here until train/cli.py lists it too."""
    click_opts = _click_params(main.commands[name])
    actions = _argparse_actions(parser_of(monkeypatch))
    assert sorted(actions) == sorted(click_opts), "train/cli.py must list the same options"
    for opt, action in actions.items():
        param = click_opts[opt]
        assert param.help, f"{name} {opt} has no help"
        assert param.is_flag == isinstance(action, argparse._StoreTrueAction), opt
        assert param.required == action.required, opt
        if opt == "--data" and name == "cv":  # argparse's default is ../shared/data/lgg, said in the help
            assert "../shared/data/lgg" in param.help
        elif not (param.is_flag or action.required):
            assert param.default == action.default, opt
        if action.choices is not None:
            assert list(param.type.choices) == list(action.choices), opt


@pytest.mark.parametrize("name, words", [
    ("train", ["Usage: segengine train [OPTIONS]", "Data options:", "Augmentation options:", "--gamma-p P",
               "--bias-field-p P", "--plan [v1|v2]", "Example"]),
    ("cv", ["Usage: segengine cv [OPTIONS] [-- TRAINING OPTIONS]", "Folds options:", "Commands:", "compare",
            "calibrate-review", "component-rule", "rescore", "Example"]),
])
def test_training_help_is_click_help(name, words):
    res = _invoke(name, "--help")
    assert res.exit_code == 0, res.output
    missing = [w for w in words if w not in res.output]
    assert not missing and "python -m" not in res.output, missing


@pytest.fixture()
def train_argv(monkeypatch):
    from segengine.train import train

    seen: list[list[str]] = []
    monkeypatch.setattr(train, "main", lambda argv: seen.append(list(argv)) or 0)
    return seen


@pytest.fixture()
def cv_argv(monkeypatch):
    from segengine.train import cv

    seen: list[list[str]] = []
    monkeypatch.setattr(cv, "main", lambda argv: seen.append(list(argv)) or 0)
    return seen


@pytest.mark.parametrize("args", [
    ["--data", "D", "--out", "O"],
    ["--data", "D", "--out", "O", "--steps", "7", "--gamma-p", "0.2", "--bias-field-p", "0.1", "--plan", "v2"],
    ["--data", "D", "--out", "O", "--folds", "5", "--fold", "2", "--init-from", "m_fold2.pt", "--resume", "--amp", "bf16"],
    ["--out=O", "--data=D", "--lr=1e-3"],
], ids=["minimal", "robust-aug-and-plan", "fold-finetune", "equals-form"])
def test_train_hands_the_arguments_on_as_given(train_argv, args):
    res = _invoke("train", *args)
    assert res.exit_code == 0, res.output
    assert train_argv == [args]


@pytest.mark.parametrize("args", [
    ["--out", "R", "--folds", "5", "--", "--steps", "4000", "--init-from", "m_fold{fold}.pt"],
    ["--out", "R", "--only", "0,1", "--steps", "7", "--intensity-aug"],  # unknown options: training's, without --
    ["--out", "R", "--score-only", "--threads", "1", "--record", "docs/cv/a.json"],
    ["compare", "runs/a", "runs/b", "--by-kind"],
    ["rescore", "m.ensemble.json", "--out", "R", "--native-only"],
    ["thresholds", "R", "--thresholds", "0.4,0.5"],
    ["calibrate-review", "R", "--data", "D"],
    ["component-rule", "R", "--data", "D"],
    ["worst", "R", "-n", "2"],
    ["compare", "--help"],  # a command's own help comes from its own parser
], ids=["double-dash", "unknown-to-training", "score-only", "compare", "rescore", "thresholds", "calibrate-review",
        "component-rule", "worst", "command-help"])
def test_cv_hands_the_arguments_on_as_given(cv_argv, args):
    res = _invoke("cv", *args)
    assert res.exit_code == 0, res.output
    assert cv_argv == [args]


@pytest.mark.parametrize("command, args, words", [
    ("train", ["--data", "D", "--out", "O", "--steps", "0"], "--steps"),
    ("train", ["--data", "D", "--out", "O", "--gamma-p", "2"], "--gamma-p"),
    ("train", ["--data", "D", "--out", "O", "--plan", "v9"], "--plan"),
    ("train", ["--data", "D", "--out", "O", "--no-such-option"], "No such option"),
    ("train", ["--out", "O"], "--data"),
    ("cv", ["--out", "R", "--only", "a,1"], "--only"),
    ("cv", ["--out", "R", "--folds", "x"], "--folds"),
    ("cv", ["compre", "a", "b"], "no cv command 'compre'"),
    ("cv", ["--folds", "5"], "--out"),
], ids=["steps-0", "p-above-1", "unknown-plan", "unknown-option", "no-data", "only-not-folds", "folds-not-int",
        "unknown-command", "no-out"])
def test_bad_training_options_are_refused_before_any_work(train_argv, cv_argv, command, args, words):
    res = _invoke(command, *args)
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
    assert train_argv == [] and cv_argv == []


def test_train_module_entry_point_keeps_its_parser():
    """`python -m segengine.train.train` (a background job's command) parses as before."""
    from segengine.train import train

    args = train.parse_args(["--data", "D", "--out", "O", "--gamma-p", "0.3", "--plan", "v2", "--stop-after", "500"])
    assert (args.data, args.out, args.gamma_p, args.plan, args.stop_after) == ("D", "O", 0.3, "v2", 500)


# ------------------------------------------------------------------ bench: --num-patients (--patients N deprecated)
@pytest.fixture()
def bench_count(monkeypatch):
    import segengine.bench.bench as bench_mod
    import segengine.engine.inference.ensemble as ensemble_mod

    seen: list[int] = []

    def fake_run_bench(spec, patients, **kwargs):
        seen.append(patients)
        raise DataError("stopped before timing")

    monkeypatch.setattr(ensemble_mod, "load_plan", lambda *a, **k: object())
    monkeypatch.setattr(bench_mod, "run_bench", fake_run_bench)
    return seen


@pytest.mark.parametrize("args, count, warned, words", [
    ([], 10, False, ""),
    (["--num-patients", "3"], 3, False, ""),
    (["--patients", "4"], 4, True, "--num-patients 4"),
    (["--patients", "kaggle_3m"], None, False, "--num-patients N"),
    (["--patients", "2", "--num-patients", "2"], None, False, "not also --patients"),
    (["--patients", "0"], None, False, "--num-patients"),
    (["--num-patients", "0"], None, False, "--num-patients"),
], ids=["default", "num-patients", "deprecated-count", "folder-refused", "both", "deprecated-zero", "zero"])
def test_bench_counts_with_num_patients(bench_count, args, count, warned, words):
    res = CliRunner().invoke(main, ["bench", "--backends", "torch", *args])
    assert "Traceback" not in res.output
    if count is None:
        assert res.exit_code == 2 and words in res.output and bench_count == [], res.output
        return
    assert bench_count == [count] and "stopped before timing" in res.output, res.output
    assert ("deprecated" in res.stderr) == warned and words in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if "warning" in ln]) == int(warned)


def test_bench_help_shows_num_patients_not_the_alias():
    res = _invoke("bench", "--help")
    assert "--num-patients N" in res.output and "--patients " not in res.output


# ------------------------------------------------------------------ --model PATH everywhere
@pytest.mark.parametrize("command", ["run", "evaluate", "validate", "bench", "export"])
def test_model_is_a_path_in_every_command(command):
    res = _invoke(command, "--help")
    assert res.exit_code == 0 and "--model PATH" in res.output and "Model options:" in res.output, res.output


def test_one_meaning_per_option_in_every_command():
    """Every command's --model is a PATH (ModelPath) and every shown --patients a folder (a path), so a
    command added later keeps the grammar; bench's count is --num-patients."""
    from segengine.engine.cli import ModelPath

    models = {name: p for name, cmd in main.commands.items() for p in cmd.params if "--model" in p.opts}
    folders = {name: p for name, cmd in main.commands.items() for p in cmd.params
               if "--patients" in p.opts and not p.hidden}
    assert {"run", "evaluate", "validate", "bench", "export"} <= set(models) and "run" in folders
    assert {n: (type(p.type).__name__, p.metavar) for n, p in models.items() if not isinstance(p.type, ModelPath)
            or p.metavar != "PATH"} == {}
    assert [n for n, p in folders.items() if not isinstance(p.type, click.Path)] == []
    assert "--num-patients" in _click_params(main.commands["bench"])


@pytest.fixture()
def evaluated(monkeypatch):
    import segengine.engine.evaluation.evaluate as evaluate_mod

    seen: list[dict] = []

    def fake_evaluate_model(data, model, *args, ensemble=None, **kwargs):
        seen.append({"model": model, "ensemble": ensemble})
        raise DataError("stopped before scoring")

    monkeypatch.setattr(evaluate_mod, "evaluate_model", fake_evaluate_model)
    return seen


@pytest.mark.parametrize("args, model, refused", [
    ([], None, None),  # no --pred: the shipped model
    (["--model"], None, None),  # the older bare --model: the same
    (["--model", "runs/a1/a1.pt"], Path("runs/a1/a1.pt"), None),
    (["--pred", "{tmp}", "--model", "m.pt"], None, "not both"),
    (["--pred", "{tmp}", "--model"], None, "not both"),
    (["--model", "--ensemble", "e.ensemble.json"], None, "not both"),
    (["--model", "m.pt", "--ensemble"], None, "not both"),
], ids=["default", "bare", "path", "pred-and-model", "pred-and-bare-model", "bare-model-and-ensemble",
        "model-and-bare-ensemble"])
def test_evaluate_model_is_a_path_defaulting_to_the_shipped_one(evaluated, tmp_path, args, model, refused):
    res = _invoke("evaluate", "--data", str(tmp_path), *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert "Traceback" not in res.output
    if refused:
        assert res.exit_code == 2 and refused in res.output and evaluated == [], res.output
    else:
        assert res.exit_code == 2 and "stopped before scoring" in res.output, res.output
        assert evaluated == [{"model": model, "ensemble": None}]


# ------------------------------------------------------------------ export --kinds: backend names
ALL_KINDS = ("onnx", "onnx-int8", "onnx-fp16", "tensorrt-fp16")


@pytest.mark.parametrize("name, kind", [
    ("onnxruntime", "onnx"), ("onnxruntime-int8", "onnx-int8"), ("onnxruntime-fp16", "onnx-fp16"),
    ("tensorrt", "tensorrt-fp16"), *[(k, k) for k in ALL_KINDS],
])
def test_export_kind_takes_backend_and_older_names(name, kind):
    from segengine.export.api import export_kind

    assert export_kind(name) == kind


@pytest.mark.parametrize("name", ["onnx-fp8", "openvino", "", "ONNXRUNTIME"])
def test_unknown_export_kinds_are_refused(name):
    from segengine.export.api import export_kind

    with pytest.raises(ExportError, match="onnxruntime-int8"):
        export_kind(name)


def test_cli_export_names_match_the_api():
    from segengine.engine.cli import EXPORT_BACKENDS
    from segengine.export.api import KIND_BACKENDS, KINDS

    assert EXPORT_BACKENDS == {backend: kind for kind, backend in KIND_BACKENDS.items()}
    assert tuple(KIND_BACKENDS) == KINDS


@pytest.fixture()
def exported(monkeypatch):
    import segengine.export.api as api

    seen: list[tuple[str, ...]] = []

    def fake_export_model(spec, kinds, log=print, **kwargs):
        seen.append(tuple(kinds))
        for kind in kinds:
            log(f"{kind}: wrote somewhere/{kind}")
        return {kind: {"skipped": "not in this test"} for kind in kinds}

    monkeypatch.setattr(api, "export_model", fake_export_model)
    return seen


@pytest.mark.parametrize("kinds, wanted, said", [
    (None, ALL_KINDS, ["onnxruntime: wrote", "onnxruntime-int8: skipped", "tensorrt: skipped"]),
    ("onnxruntime,onnxruntime-int8", ("onnx", "onnx-int8"), ["onnxruntime-int8: wrote", "onnxruntime-int8: skipped"]),
    ("onnx-int8,tensorrt-fp16", ("onnx-int8", "tensorrt-fp16"), ["onnxruntime-int8: skipped", "tensorrt: skipped"]),
    ("tensorrt, onnx ,tensorrt", ("tensorrt-fp16", "onnx"), ["tensorrt: skipped", "onnxruntime: skipped"]),
], ids=["default", "backend-names", "older-names", "spaces-and-repeats"])
def test_export_kinds_named_as_backends(exported, kinds, wanted, said):
    res = _invoke("export", *(["--kinds", kinds] if kinds else []))
    assert res.exit_code == 0, res.output
    assert exported == [wanted]
    missing = [w for w in said if w not in res.output]
    assert not missing and "onnx-int8:" not in res.output, res.output


@pytest.mark.parametrize("kinds, words", [("onnx-fp8", "unknown export kind 'onnx-fp8'"), (",", "names no backend")])
def test_export_refuses_unknown_kinds_before_any_work(exported, kinds, words):
    res = _invoke("export", "--kinds", kinds)
    assert res.exit_code == 2 and words in res.output and exported == [], res.output


def test_export_help_names_the_backends():
    res = _invoke("export", "--help")
    assert "onnxruntime-int8" in res.output and "tensorrt" in res.output and "older names" in res.output


# ------------------------------------------------------------------ shared option groups in --help
@pytest.mark.parametrize("command, sections", [
    ("run", ["Patients options:", "Model options:", "Mask options:", "Input limits options:", "Options:"]),
    ("evaluate", ["Patients options:", "Model options:", "Mask options:", "Input limits options:"]),
    ("validate", ["Patients options:", "Model options:", "Input limits options:"]),
    ("bench", ["Patients options:", "Model options:"]),
    ("export", ["Patients options:", "Model options:"]),
])
def test_help_groups_the_shared_options(command, sections):
    out = _invoke(command, "--help").output
    positions = [out.find(s) for s in sections]
    assert -1 not in positions and positions == sorted(positions), out
