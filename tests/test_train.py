"""Training: network shapes, augmentation, and a tiny real run that resumes exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TRAIN_PATIENT, VAL_PATIENTS
from segengine.engine.model.network import build_model, count_flops
from segengine.train import train as train_mod

ARCHS = [
    {"name": "resunet", "base_channels": 4, "deep_supervision": True},
    {"name": "resunet", "base_channels": 4, "deep_supervision": False},
    {"name": "resunet", "base_channels": 4, "deep_supervision": True, "refine_channels": 4},
    {"name": "resunet", "base_channels": 4, "deep_supervision": False, "refine_channels": 4},
]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"ds{int(a['deep_supervision'])}-refine{a.get('refine_channels', 0)}")
@pytest.mark.parametrize("size", [256, 192, 64])
def test_resunet_outputs_logits_on_the_input_grid(arch, size):
    torch.manual_seed(0)
    model = build_model(arch)
    x = torch.randn(2, 3, size, size)
    model.train()
    out = model(x)
    outputs = out if isinstance(out, list) else [out]
    expected = (1 + 2 + ("refine_channels" in arch)) if arch["deep_supervision"] else 1
    assert len(outputs) == expected
    assert all(o.shape == (2, 1, size, size) for o in outputs)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 1, size, size)


def test_refinement_branch_flops_match_its_convolutions():
    plain = count_flops(build_model({"name": "resunet", "base_channels": 16}))
    refined = count_flops(build_model({"name": "resunet", "base_channels": 16, "refine_channels": 8}))
    # the branch works on 256x256: (3->8) + (24->8) + (8->8) 3x3 convs and a 1x1 head
    branch = 2 * 256 * 256 * (9 * 3 * 8 + 9 * 24 * 8 + 9 * 8 * 8 + 8)
    assert refined - plain == pytest.approx(branch, rel=0.02)
    assert refined <= 24e9 / 10


def test_refinement_needs_the_stride_2_stem():
    with pytest.raises(ValueError, match="stem_stride 2"):
        build_model({"name": "resunet", "base_channels": 4, "stem_stride": 1, "refine_channels": 4})


def test_intensity_augment_is_seeded_and_the_identity_at_probability_0():
    x = torch.randn(8, 3, 32, 32)
    a = train_mod.intensity_augment(x, torch.Generator().manual_seed(1))
    b = train_mod.intensity_augment(x, torch.Generator().manual_seed(1))
    c = train_mod.intensity_augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.shape == x.shape
    g = train_mod.intensity_augment(x, torch.Generator().manual_seed(3), p=0.0)
    assert torch.allclose(g, x, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_run_args(kaggle_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    (d / "train.txt").write_text(TRAIN_PATIENT + "\n")
    (d / "val.txt").write_text(VAL_PATIENTS[0] + "\n")

    def args(out: str, *extra: str) -> list[str]:
        return ["--data", str(kaggle_root), "--train-list", str(d / "train.txt"), "--val-list", str(d / "val.txt"),
                "--out", str(d / out), "--base-channels", "4", "--refine-channels", "4", "--intensity-aug",
                "--batch-size", "2", "--crop", "64", "--steps", "4", "--epoch-steps", "2", "--threads", "1",
                "--cache-dir", str(d / "cache"), *extra]

    return d, args


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_run_args):
    d, args = tiny_run_args
    assert train_mod.main(args("straight")) == 0
    assert train_mod.main(args("split", "--stop-after", "2")) == 0
    assert not (d / "split" / "final_weights.pt").exists()
    assert json.loads((d / "split" / "history.json").read_text())[-1]["step"] == 2
    assert train_mod.main(args("split", "--resume")) == 0

    straight = torch.load(d / "straight" / "final_weights.pt", weights_only=True)
    resumed = torch.load(d / "split" / "final_weights.pt", weights_only=True)
    assert straight["architecture"] == resumed["architecture"]
    assert straight["architecture"]["refine_channels"] == 4
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    history = json.loads((d / "split" / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    assert 0.0 <= history[-1]["val_dsc_reference"] <= 1.0
    assert (d / "split" / "tb").is_dir() and any((d / "split" / "tb").iterdir())


def test_overlapping_train_and_validation_lists_are_refused(kaggle_root, tmp_path):
    lst = tmp_path / "both.txt"
    lst.write_text(VAL_PATIENTS[0] + "\n")
    with pytest.raises(SystemExit, match="overlap"):
        train_mod.main(["--data", str(kaggle_root), "--train-list", str(lst), "--val-list", str(lst),
                        "--out", str(tmp_path / "run")])


def test_slice_errors_counts_misses_and_their_flair():
    from segengine.train.slice_errors import slice_errors

    images = np.zeros((3, 3, 8, 8), np.float32)
    images[:, 1, :4] = 2.0  # bright FLAIR on the top half
    truth = np.zeros((3, 8, 8), np.uint8)
    truth[1, :, :2] = 1  # 16 px: 8 bright (top), 8 dark (bottom)
    prob = np.where(images[:, 1] > 1, 0.9, 0.1).astype(np.float32)
    pred = prob > 0.5
    pred[0] = False  # slice 0: nothing; slice 2: a false alarm only
    rows = slice_errors(images, truth, prob, pred)
    assert [r["slice"] for r in rows] == [1, 2]
    hit = rows[0]
    assert (hit["truth_px"], hit["pred_px"], hit["tp_px"]) == (16, 32, 8)
    assert hit["p_on_missed"] == pytest.approx(0.1) and hit["flair_on_missed"] == 0.0
    assert hit["flair_on_truth"] == pytest.approx(1.0)
    assert rows[1]["truth_px"] == 0 and rows[1]["p_on_missed"] is None


def test_init_from_loads_a_shipped_models_weights_and_refuses_another_architecture(tmp_path):
    """Fine-tuning starts from the shipped fold model: every weight it has is copied, the dropped heads stay fresh."""
    from pathlib import Path
    (shipped,) = (Path(__file__).resolve().parents[1] / "models").glob("*_fold3.pt")  # the shipped ensemble's member
    state = torch.load(shipped, map_location="cpu", weights_only=True)["state_dict"]
    model = build_model({"name": "resunet", "base_channels": 16, "in_channels": 9, "deep_supervision": True})
    train_mod.init_weights(model, str(shipped))
    loaded = model.state_dict()
    assert set(state) < set(loaded)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    narrow = build_model({"name": "resunet", "base_channels": 8, "in_channels": 9, "deep_supervision": True})
    with pytest.raises(SystemExit, match="do not fit"):
        train_mod.init_weights(narrow, str(shipped))


def test_a_fine_tunes_card_names_its_starting_weights_after_they_are_replaced(tiny_run_args):
    """v3 fine-tunes the shipped file it then replaces: the card keeps that file's SHA-256 (also across
    --stop-after / --resume) and the lr."""
    from segengine.engine.model.spec import sha256_file
    from segengine.train.ship import ship_run

    d, args = tiny_run_args
    assert train_mod.main(args("ft_base")) == 0
    start = d / "ft_base" / "final_weights.pt"
    start_sha = sha256_file(start)
    assert train_mod.main(args("ft", "--init-from", str(start), "--lr", "0.001", "--stop-after", "2")) == 0
    start.write_bytes(b"replaced")  # between sessions: the resumed run must keep the first start's hash
    assert train_mod.main(args("ft", "--init-from", str(start), "--lr", "0.001", "--resume")) == 0
    card = ship_run(d / "ft", d / "ft.pt")
    assert card["training"]["init_from"] == {"weights": str(start), "sha256": start_sha}
    assert card["training"]["lr"] == 0.001
    assert f" --lr 0.001 --init-from {start}" in card["training"]["command"]
    assert "init_from_sha256" not in json.loads((d / "ft_base" / "config.json").read_text())


def test_average_init_is_the_mean_of_the_start_and_the_trained_weights(tiny_run_args):
    """--average-init 0.5: every float tensor the midpoint of start and trained; a second average is refused."""
    from segengine.train import soup
    from segengine.train.ship import ship_run

    d, args = tiny_run_args
    assert train_mod.main(args("soup_base")) == 0
    start = d / "soup_base" / "final_weights.pt"
    assert train_mod.main(args("soup", "--init-from", str(start), "--lr", "0.001", "--average-init", "0.5")) == 0
    s0 = torch.load(start, weights_only=True)["state_dict"]
    trained = torch.load(d / "soup" / soup.TRAINED, weights_only=True)["state_dict"]
    final = torch.load(d / "soup" / "final_weights.pt", weights_only=True)["state_dict"]
    moved = 0
    for name, t in trained.items():
        if t.is_floating_point():
            assert torch.allclose(final[name], (s0[name] + t) / 2, atol=1e-7), name
            moved += int(not torch.equal(s0[name], t))
        else:
            assert torch.equal(final[name], t), name
    assert moved > 0  # training changed weights, so the average is neither end
    card = ship_run(d / "soup", d / "soup.pt")
    assert "--average-init 0.5" in card["training"]["command"]
    assert card["training"]["weight_averaging"].startswith("0.5 x the starting weights")
    with pytest.raises(soup.SoupError, match="already averaged"):
        soup.average_with_start(d / "soup", 0.5)
    assert soup.main([str(d / "soup_base")]) == 2  # trained from scratch: one line, exit 2
    with pytest.raises(SystemExit, match="needs --init-from"):
        train_mod.main(args("soup_bad", "--average-init", "0.5"))
