"""engine.stages: overlapped, bounded stages with per-item errors and a clean stop."""
from __future__ import annotations

import threading
import time
from contextlib import closing

import pytest

from segengine.engine.job.stages import Outcome, run_stages


def _stage_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("stage-")]


def test_items_pass_every_stage_in_order():
    stages = [("add", lambda x: x + 1), ("double", lambda x: x * 2), ("text", str)]
    outcomes = list(run_stages(range(20), stages))
    assert [o.item for o in outcomes] == list(range(20))
    assert [o.value for o in outcomes] == [str((i + 1) * 2) for i in range(20)]
    assert all(o.ok and o.stage is None for o in outcomes)
    assert not _stage_threads()


@pytest.mark.parametrize("items, stages, queue_size, error", [
    (range(3), [], 1, ValueError),
    (range(3), [("id", lambda x: x)], 0, ValueError),
])
def test_bad_arguments(items, stages, queue_size, error):
    with pytest.raises(error):
        list(run_stages(items, stages, queue_size=queue_size))


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_no_items_no_outcomes(n_stages):
    assert list(run_stages([], [(f"s{k}", lambda x: x) for k in range(n_stages)])) == []


def test_first_and_last_stages_overlap():
    """Item 1 is read while item 0 is written: both calls wait for each other at a barrier,
    which only completes if they run at the same time."""
    meet = threading.Barrier(2, timeout=10)

    def read(i):
        if i == 1:
            meet.wait()
        return i

    def write(i):
        if i == 0:
            meet.wait()
        return i

    outcomes = list(run_stages(range(3), [("read", read), ("infer", lambda i: i), ("write", write)]))
    assert [o.value for o in outcomes] == [0, 1, 2] and all(o.ok for o in outcomes)


@pytest.mark.parametrize("queue_size", [1, 2])
def test_items_in_flight_are_bounded(queue_size):
    """With a consumer that stops taking outcomes, the first stage pulls at most
    stages x (queue_size + 1) + 1 items: memory does not grow with the job."""
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield i

    stages = [(f"s{k}", lambda x: x) for k in range(3)]
    with closing(run_stages(source(), stages, queue_size=queue_size)) as outcomes:
        first = next(outcomes)
        time.sleep(0.5)  # let every stage fill its queue; the bound holds however long this is
        in_flight = len(pulled)
    assert first.item == 0
    assert in_flight <= 3 * (queue_size + 1) + 1
    assert not _stage_threads()


def test_an_item_error_skips_later_stages_and_the_others_go_on():
    written = []

    def infer(i):
        if i == 3:
            raise ValueError(f"patient {i} is bad")
        return i

    def write(i):
        written.append(i)
        return i

    outcomes = list(run_stages(range(6), [("read", lambda i: i), ("infer", infer), ("write", write)],
                               catch=(ValueError,)))
    bad = outcomes[3]
    assert isinstance(bad, Outcome) and not bad.ok and bad.stage == "infer" and bad.value is None
    assert str(bad.error) == "patient 3 is bad"
    assert [o.value for o in outcomes if o.ok] == [0, 1, 2, 4, 5]
    assert written == [0, 1, 2, 4, 5]


@pytest.mark.parametrize("where", ["source", "stage"])
def test_an_unexpected_error_stops_the_job_and_reaches_the_consumer(where):
    def source():
        yield from range(3)
        if where == "source":
            raise RuntimeError("listing failed")
        yield from range(3, 100)

    def infer(i):
        if where == "stage" and i == 5:
            raise RuntimeError("bug in infer")
        return i

    with pytest.raises(RuntimeError, match="listing failed" if where == "source" else "bug in infer"):
        list(run_stages(source(), [("read", lambda i: i), ("infer", infer)], catch=(ValueError,)))
    assert not _stage_threads()


def test_interrupt_stops_cleanly_and_finishes_writes_in_progress():
    """Ctrl-C (or SIGTERM raised as KeyboardInterrupt) in the consumer: no new item starts,
    a write in progress completes, every thread is joined."""
    started, finished = [], []
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield i

    def write(i):
        started.append(i)
        time.sleep(0.05)
        finished.append(i)
        return i

    seen = []
    with pytest.raises(KeyboardInterrupt):
        with closing(run_stages(source(), [("read", lambda i: i), ("write", write)])) as outcomes:
            for o in outcomes:
                seen.append(o.value)
                if len(seen) == 2:
                    raise KeyboardInterrupt
    assert seen == [0, 1]
    assert started == finished  # nothing left half-written
    assert len(pulled) < 20  # stopped, not drained
    assert not _stage_threads()


def test_a_halting_error_reports_its_item_and_starts_nothing_more():
    """A full disk: its outcome comes back, no stage starts another item, the rest get no outcome."""

    class DiskFull(OSError):
        pass

    written = []

    def write(i):
        written.append(i)
        if i == 2:
            raise DiskFull("no space left on device")
        return i

    outcomes = list(run_stages(range(50), [("read", lambda i: i), ("infer", lambda i: i), ("write", write)],
                               catch=(OSError,), halt_on=(DiskFull,)))
    assert [o.item for o in outcomes] == [0, 1, 2]
    assert outcomes[2].stage == "write" and isinstance(outcomes[2].error, DiskFull)
    assert written == [0, 1, 2]
    assert not _stage_threads()
