"""What every adapter shares: the missing-library error naming the extra."""
from __future__ import annotations

import importlib.util

#: the pip command that installs every peer library
PEERS_EXTRA = 'pip install -e ".[peers]"'


class MissingPeerLibrary(ImportError):
    """A peer library an adapter needs is not installed."""


def require(module: str, distribution: str, adapter: str) -> None:
    """Raise MissingPeerLibrary unless `module` can be imported (checked without importing it)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingPeerLibrary(f"{adapter} needs the peer library {distribution!r}, which is not installed: "
                                 f"install the extra with {PEERS_EXTRA} (README, 'Peer libraries')", name=module)
