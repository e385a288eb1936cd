"""Adapters to peer influence libraries: kronfluence (`kronfluence.py`) and pyDVL (`pydvl.py`).

The libraries are an optional extra (`pip install -e ".[peers]"`; README, "Peer libraries"). The
adapter modules import their library only inside `fit`, so registering them (PEER_REGISTRY, which
`estimators.make_estimator` consults after REGISTRY) imports nothing; constructing one whose
library is missing raises MissingPeerLibrary, an ImportError that names the extra.
PEER_REGISTRY is kept apart from REGISTRY so that the suites iterating over REGISTRY (conformance,
not-fitted, sign agreement) keep running in an environment without the extra;
tests/test_adapters.py checks the adapters where their library is installed.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from ._common import PEERS_EXTRA, MissingPeerLibrary, require
from .kronfluence import KronfluenceInfluence
from .pydvl import PyDVLArnoldi, PyDVLCG, PyDVLEKFAC, PyDVLLiSSA, PyDVLNystroem

PEER_REGISTRY: dict[str, Callable] = {
    "kronfluence-ekfac": partial(KronfluenceInfluence, strategy="ekfac"),
    "kronfluence-kfac": partial(KronfluenceInfluence, strategy="kfac"),
    "pydvl-cg": PyDVLCG,
    "pydvl-lissa": PyDVLLiSSA,
    "pydvl-arnoldi": PyDVLArnoldi,
    "pydvl-nystroem": PyDVLNystroem,
    "pydvl-ekfac": PyDVLEKFAC,
}

__all__ = ["PEER_REGISTRY", "PEERS_EXTRA", "MissingPeerLibrary", "require", "KronfluenceInfluence", "PyDVLCG",
           "PyDVLLiSSA", "PyDVLArnoldi", "PyDVLNystroem", "PyDVLEKFAC"]
