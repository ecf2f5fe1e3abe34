"""The network's one error type (a leaf: imports only core.errors)."""
from __future__ import annotations

from segengine.engine.core.errors import ResourceError


class NetworkError(ResourceError):
    """A peer that cannot be reached, refuses us or goes away mid-transfer, after the retries;
    one line naming the peer, exit 1 (as a full disk: the input is fine, try again later)."""
