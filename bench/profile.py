"""Profile a `segengine` command in every thread, in CPU time, and summarize it per stage.

    python -m segengine.bench.profile [--out DIR] -- run --patients ROOT --out OUT --backend onnxruntime-int8

cProfile only sees the thread that enables it, and `run --patients` works in stage threads
(job.stages), so each thread gets its own profiler timed with ``time.thread_time``: CPU
seconds, which a loaded machine inflates much less than wall time. Prints, per thread, its
CPU seconds and the engine functions that spent them; ``--out`` keeps one .prof per thread
for snakeviz/pstats. ONNX Runtime's and OpenBLAS's own pool threads are not Python
threads: the infer thread shows only the share of inference that ran in it.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
import time
from pathlib import Path

# engine functions reported per thread (cumulative CPU seconds), in pipeline order
FUNCTIONS = ("read_patient", "preprocess_volume", "resize_slices", "percentiles", "normalize_volume", "predict",
             "finish_patient", "to_original_grid", "postprocess", "report_dict", "write_patient", "write_mask_slices",
             "contact_sheet", "save")


def _profiled_run(original_run, profiles: dict[str, cProfile.Profile]):
    def run(self):
        prof = cProfile.Profile(time.thread_time)
        profiles[self.name] = prof
        prof.enable()
        try:
            original_run(self)
        finally:
            prof.disable()

    return run


def summarize(profiles: dict[str, cProfile.Profile]) -> str:
    import segengine.engine as engine_pkg

    root = str(Path(engine_pkg.__file__).resolve().parent.parent)  # the checkout, whatever its folder is called
    lines = []
    for name, prof in profiles.items():
        stats = pstats.Stats(prof, stream=io.StringIO())
        total = stats.total_tt
        rows = {}
        for (path, _, func), (_, _, _, cum, _) in stats.stats.items():
            if func in FUNCTIONS and (path.startswith(root) or "segengine" in path or func == "save"):
                rows[func] = max(rows.get(func, 0.0), cum)
        parts = ", ".join(f"{f} {rows[f]:.2f}" for f in FUNCTIONS if rows.get(f, 0) >= 0.005)
        lines.append(f"{name:>14}: {total:6.2f} CPU s  ({parts})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write <thread>.prof files here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then segengine arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a segengine command after --")
    from segengine.engine.cli import main as segengine

    profiles: dict[str, cProfile.Profile] = {}
    threading.Thread.run = _profiled_run(threading.Thread.run, profiles)
    main_prof = cProfile.Profile(time.thread_time)
    profiles["main"] = main_prof
    t = time.perf_counter()
    main_prof.enable()
    try:
        segengine(command, standalone_mode=False)
    finally:
        main_prof.disable()
        wall = time.perf_counter() - t
        print(f"\nprofile: {wall:.2f} s wall; CPU seconds per Python thread (time.thread_time; native pools "
              "of ONNX Runtime not included):", file=sys.stderr)
        print(summarize(profiles), file=sys.stderr)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for name, prof in profiles.items():
                prof.dump_stats(args.out / f"{name}.prof")
    return 0


if __name__ == "__main__":
    sys.exit(main())
