"""Pick and create a backend by name: availability for a model or plan, ``auto`` as the fastest
trusted backend measured on this machine (with a usable CUDA GPU: of the GPU backends trusted for
this GPU model; else of the CPU backends on this CPU), one averaging runner over per-member runners
for a plan."""
from __future__ import annotations

from segengine.engine.core.errors import BackendUnavailable
from segengine.engine.inference.backends import AUTO_CANDIDATES, GPU_CANDIDATES, REGISTRY, backend_class
from segengine.engine.inference.backends.base import Backend


def why_unavailable(name: str, spec=None) -> str | None:
    """None when ``name`` is usable here for ``spec`` (for an ensemble or TTA plan: for every
    member model), else the reason."""
    from segengine.engine.inference.ensemble import members_of

    try:
        cls = backend_class(name)
        return next((why for why in map(cls.availability, members_of(spec)) if why), None)
    except BackendUnavailable as exc:
        return str(exc)


def availability(spec=None) -> dict[str, str | None]:
    """name -> None if usable here for ``spec``, else why not."""
    return {name: why_unavailable(name, spec) for name in REGISTRY}


def runs_on_gpu(name: str) -> bool:
    """``name`` computes on a CUDA GPU here (torch does where CUDA is usable: it is the reference there)."""
    from segengine.engine.inference import gpu

    if name == "torch":
        return gpu.why_no_cuda() is None
    return name in GPU_CANDIDATES or bool(getattr(backend_class(name), "on_gpu", False))


def trusted_candidates(candidates: list[str], spec) -> list[str]:
    """Those of ``candidates`` available here with a trusted verdict for every member of ``spec``."""
    from segengine.engine.inference.ensemble import members_of
    from segengine.engine.inference.verdict import why_untrusted

    return [c for c in candidates
            if why_unavailable(c, spec) is None and all(why_untrusted(m, c) is None for m in members_of(spec))]


def resolve_on_gpu(spec, threads: int | None = None) -> str | None:
    """``auto`` where a CUDA GPU is usable: the fastest GPU backend trusted for this GPU model (ms/slice
    keyed by the GPU), else torch, which runs on the GPU in fp32; None without a usable GPU."""
    from segengine.engine.inference import gpu
    from segengine.engine.inference.ensemble import members_of
    from segengine.engine.inference.speed import fastest

    if gpu.why_no_cuda() is not None:
        return None
    trusted = trusted_candidates(GPU_CANDIDATES, spec)
    picked = fastest(members_of(spec)[0], trusted, threads, create=backend_class,
                     machine=gpu.machine_key(gpu.identity())) if trusted else None
    if picked:
        return picked
    return "torch" if why_unavailable("torch", spec) is None else None


def resolve(name: str, spec, threads: int | None = None) -> str:
    """Turn ``auto`` into one backend for the whole run: with a usable CUDA GPU, the fastest GPU
    backend with a PASS for this GPU model (``resolve_on_gpu``); else the fastest on this CPU
    (measured ms/slice at ``threads``) among those available with a trusted verdict for ``spec``
    (for an ensemble or TTA plan: for every member model); torch when none is."""
    from segengine.engine.inference.ensemble import members_of

    if name != "auto":
        why = why_unavailable(name, spec)
        if why:
            usable = [n for n, w in availability(spec).items() if w is None]
            raise BackendUnavailable(f"backend {name!r} is not available: {why} (available: {', '.join(usable) or 'none'})")
        from segengine.engine.inference.verdict import recorded_fail

        members = members_of(spec)
        failed = [m.name for m in members if recorded_fail(m, name)] if len(members) > 1 else []
        if failed:  # an ensemble would average in a member proven to differ from torch (issue 30)
            raise BackendUnavailable(f"backend {name!r} failed `segengine validate` for ensemble member{'s' if len(failed) > 1 else ''} "
                                     f"{', '.join(failed)}: run the ensemble with --backend auto (a backend every member "
                                     "passed) or torch")
        return name
    from segengine.engine.inference.speed import fastest

    on_gpu = resolve_on_gpu(spec, threads)
    if on_gpu:
        return on_gpu
    trusted = trusted_candidates(AUTO_CANDIDATES, spec)
    # the members of a plan share one architecture: the first one's timings stand for all
    picked = fastest(members_of(spec)[0], trusted, threads, create=backend_class) if trusted else None
    if picked:
        return picked
    if why_unavailable("torch", spec) is None:
        return "torch"
    raise BackendUnavailable("no backend is available (install torch or onnxruntime)")


def create(name: str, spec, threads: int | None = None) -> Backend:
    """One runner for a model; an averaging runner over one runner per member for a plan."""
    from segengine.engine.inference.ensemble import AveragingBackend, InferencePlan

    name = resolve(name, spec, threads)
    if isinstance(spec, InferencePlan):
        return AveragingBackend(spec, [backend_class(name)(m, threads=threads) for m in spec.members])
    return backend_class(name)(spec, threads=threads)
