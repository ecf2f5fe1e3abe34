"""Weight averaging of a fine-tune with the weights it started from (a two-model "soup").

    python -m segengine.train.soup runs/cv/v3/fold0 --weight 0.5     # a finished --init-from run
    segengine train ... --init-from models/resunet16.pt --average-init 0.5   # the same, at the last step

A fine-tune of a model stays in its basin, so the average of the start and the end is a model
of the same network and the same cost. v3 is v2 + 2000 steps averaged with v2 at 0.5: the
fine-tune alone gained as much on average but lost up to 7.5 points on some patients; the
average kept the gain and its largest loss was 2.7 (REPORT, issue 23).

The run's ``final_weights.pt`` becomes the average; the trained weights are kept beside it as
``trained_weights.pt`` (which also marks the run as averaged: a second call is refused), and
``config.json`` records the weight and the start's SHA-256 for the card.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from segengine.engine.core.atomic import atomic_file, write_json_atomic
from segengine.engine.model.spec import sha256_file

TRAINED = "trained_weights.pt"


class SoupError(ValueError):
    """A run that cannot be averaged: not a fine-tune, already averaged, or another network."""


def average_state(start: dict, trained: dict, weight: float) -> dict:
    """``(1 - weight) * start + weight * trained`` per floating tensor, in float32 (a float16-stored
    start is widened first); integer buffers and tensors the start lacks (deep-supervision heads that
    shipped models drop) are the trained ones."""
    out = {}
    for key, value in trained.items():
        base = start.get(key)
        if base is not None and base.shape != value.shape:
            raise SoupError(f"{key}: the start has shape {tuple(base.shape)}, the run {tuple(value.shape)}")
        if base is None or not value.is_floating_point():
            out[key] = value
        else:
            out[key] = (1.0 - weight) * base.float() + weight * value.float()
    return out


def average_with_start(run: Path, weight: float) -> dict:
    """Average a finished ``--init-from`` run's last weights with its start; returns the soup record."""
    if not 0.0 < weight < 1.0:
        raise SoupError(f"--weight {weight}: must be strictly between 0 and 1 (the trained model's share)")
    config_file, final = run / "config.json", run / "final_weights.pt"
    if not final.is_file() or not config_file.is_file():
        raise SoupError(f"{run}: not a finished training run (no final_weights.pt / config.json)")
    if (run / TRAINED).exists():
        raise SoupError(f"{run}: already averaged ({TRAINED} is there)")
    config = json.loads(config_file.read_text())
    start_path = config.get("init_from")
    if not start_path:
        raise SoupError(f"{run}: trained from scratch (no --init-from): nothing to average with")
    start_sha = sha256_file(Path(start_path))
    if config.get("init_from_sha256") and config["init_from_sha256"] != start_sha:
        raise SoupError(f"{start_path}: not the file this run started from (SHA-256 {start_sha[:12]}..., "
                        f"the run names {config['init_from_sha256'][:12]}...)")
    start = torch.load(start_path, map_location="cpu", weights_only=True)
    start = start.get("state_dict", start)
    payload = torch.load(final, map_location="cpu", weights_only=True)
    payload["state_dict"] = average_state(start, payload["state_dict"], weight)
    try:
        with atomic_file(final) as tmp:
            torch.save(payload, tmp)
            os.link(final, run / TRAINED)  # the trained bytes stay, under their new name, as final is replaced
    except BaseException:
        (run / TRAINED).unlink(missing_ok=True)
        raise
    config.update(init_from_sha256=start_sha, average_init=weight)  # what the card names
    write_json_atomic(config_file, config)
    return {"weight": weight, "start": str(start_path), "start_sha256": start_sha}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m segengine.train.soup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished training run that started from --init-from")
    ap.add_argument("--weight", type=float, default=0.5, help="the trained weights' share (default 0.5)")
    args = ap.parse_args(argv)
    try:
        record = average_with_start(args.run, args.weight)
    except SoupError as exc:
        print(f"segengine: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.run}/final_weights.pt: {1 - args.weight:g} x {record['start']} + {args.weight:g} x the trained weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
