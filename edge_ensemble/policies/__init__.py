"""Decoding policies. :func:`make_policy` is the one place that maps a policy name to its class."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..decisions import Sampling
from ..errors import UsageError
from ..member import Member
from .base import ContextFull, Piece, Policy, PolicyConfig, PolicyStats
from .eager import EagerConfig, EagerRun
from .every_token import EveryTokenPolicy
from .safe import SafePolicy
from .single import SinglePolicy

POLICIES = {"single": SinglePolicy, "every-token": EveryTokenPolicy, "safe": SafePolicy, "eager": EagerRun}

__all__ = ["POLICIES", "ContextFull", "Piece", "Policy", "PolicyConfig", "PolicyStats", "make_policy"]


def make_policy(name: str, members: Sequence[Member], config: PolicyConfig, sampling: Sampling, rng: np.random.Generator) -> Policy:
    """Build the named policy over ``members`` (the first member drafts / is the single model)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UsageError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}") from None
    return cls(members, config, sampling, rng)
