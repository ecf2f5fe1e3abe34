"""Pick and create a backend by name: availability for a model or plan, ``auto`` as the fastest
trusted backend measured on this CPU, one averaging runner over per-member runners for a plan."""
from __future__ import annotations

from segengine.engine.core.errors import BackendUnavailable
from segengine.engine.inference.backends import AUTO_CANDIDATES, REGISTRY, backend_class
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


def resolve(name: str, spec, threads: int | None = None) -> str:
    """Turn ``auto`` into the fastest backend on this CPU (measured ms/slice at ``threads``) among
    those available with a trusted verdict for ``spec`` (for an ensemble or TTA plan: for every
    member model); torch when none is."""
    from segengine.engine.inference.ensemble import members_of

    if name != "auto":
        why = why_unavailable(name, spec)
        if why:
            usable = [n for n, w in availability(spec).items() if w is None]
            raise BackendUnavailable(f"backend {name!r} is not available: {why} (available: {', '.join(usable) or 'none'})")
        return name
    from segengine.engine.inference.speed import fastest
    from segengine.engine.inference.verdict import why_untrusted

    trusted = [c for c in AUTO_CANDIDATES
               if why_unavailable(c, spec) is None and all(why_untrusted(m, c) is None for m in members_of(spec))]
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
