"""Overlapped stages: items flow through a fixed list of stages, each stage in its own thread.

`segengine run --patients` reads and preprocesses patient i+1 and writes patient i-1 while
patient i is inferred. ONNX Runtime, numpy's large operations, the image decoders and zlib
release the GIL, so on two cores the stages really run at once. The queues between stages
hold at most ``queue_size`` items, so memory is bounded by about
``len(stages) * (queue_size + 1)`` items however long the job is.

Errors are per item: an exception of a type in ``catch`` ends that item's trip (later
stages are skipped) and comes back in its :class:`Outcome`; the other items go on. One of a
type in ``halt_on`` (a full disk) also halts the job: its outcome comes back, calls in
progress finish, no stage starts another item, and the items not through yet are dropped
(they get no outcome). Any
other exception (a bug, an exhausted iterator that raises) stops every stage and is
re-raised to the consumer. When the consumer stops (Ctrl-C, SIGTERM turned into
KeyboardInterrupt, or simply closing the generator), no stage starts a new item, the calls
in progress finish (a write in progress completes: it is atomic), the threads are joined
and the exception goes on unwinding.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


POLL_S = 0.1  # how often a blocked stage looks whether the job was stopped


_END = object()


@dataclass
class Outcome(Generic[T]):
    """One item after its trip: ``value`` is what the last stage returned, unless ``error``."""

    item: T
    value: Any = None
    error: BaseException | None = None
    stage: str | None = None  # the stage that raised ``error``

    @property
    def ok(self) -> bool:
        return self.error is None


class _Stopped(Exception):
    """The job was stopped while a stage waited on a queue."""


def _put(q: queue.Queue, packet, stop: threading.Event) -> None:
    while True:
        try:
            q.put(packet, timeout=POLL_S)
            return
        except queue.Full:
            if stop.is_set():
                raise _Stopped from None


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        try:
            return q.get(timeout=POLL_S)
        except queue.Empty:
            if stop.is_set():
                raise _Stopped from None


def run_stages(items: Iterable[T], stages: Sequence[tuple[str, Callable[[Any], Any]]], queue_size: int = 1,
               catch: tuple[type[BaseException], ...] = (Exception,),
               halt_on: tuple[type[BaseException], ...] = ()) -> Iterator[Outcome[T]]:
    """Yield one :class:`Outcome` per item, in input order, as each leaves the last stage.

    ``stages`` is a list of ``(name, fn)``; the first ``fn`` gets the item, each next one
    what the previous returned. ``items`` is iterated in the first stage's thread, so a
    lazy iterable costs nothing up front.
    """
    if not stages:
        raise ValueError("run_stages needs at least one stage")
    if queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, got {queue_size}")
    stop = threading.Event()  # the consumer left or a stage failed: every stage ends now
    halt = threading.Event()  # an item error in halt_on: no stage starts another item
    fatal: list[BaseException] = []
    outs = [queue.Queue(maxsize=queue_size) for _ in stages]

    def packets(k: int) -> Iterator[Outcome]:
        if k == 0:
            for item in items:
                if stop.is_set() or halt.is_set():
                    return
                yield Outcome(item, value=item)
            return
        while True:
            packet = _get(outs[k - 1], stop)
            if packet is _END:
                return
            yield packet

    def work(k: int) -> None:
        name, fn = stages[k]
        try:
            for packet in packets(k):
                if stop.is_set():
                    return
                if packet.error is None:
                    if halt.is_set():
                        continue  # dropped: started before the halt, not to be finished
                    try:
                        packet.value = fn(packet.value)
                    except catch as exc:
                        packet.value, packet.error, packet.stage = None, exc, name
                        if isinstance(exc, halt_on):
                            halt.set()
                _put(outs[k], packet, stop)
            _put(outs[k], _END, stop)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - not an item error: stop the job, tell the consumer
            fatal.append(exc)
            stop.set()

    threads = [threading.Thread(target=work, args=(k,), name=f"stage-{name}", daemon=True)
               for k, (name, _) in enumerate(stages)]
    for t in threads:
        t.start()
    try:
        while True:
            try:
                packet = _get(outs[-1], stop)
            except _Stopped:
                break
            if packet is _END or fatal:
                break
            yield packet
    finally:
        stop.set()
        for t in threads:
            t.join()
    if fatal:
        raise fatal[0]
