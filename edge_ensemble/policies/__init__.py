"""Decoding policies. :func:`make_policy` is the one place that maps a policy name to its class.

A policy declares the options it reads in its class attribute ``options``; :data:`POLICY_OPTIONS` gathers them
and :class:`PolicyConfig` holds their values. The CLI flags, config keys and API keywords follow from there.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..decisions import Gate, Sampling
from ..errors import UsageError
from ..member import Member
from ..options import Option, by_name, with_options
from .base import ContextFull, Piece, Policy, PolicyStats
from .eager import EagerConfig, EagerRun
from .every_token import EveryTokenPolicy
from .route import RoutePolicy
from .safe import SafePolicy
from .single import SinglePolicy

POLICIES = {"single": SinglePolicy, "every-token": EveryTokenPolicy, "safe": SafePolicy, "eager": EagerRun,
            "route": RoutePolicy}

POLICY = Option("policy", str, "safe", "single: the first member alone; every-token: all members choose every "
                "token; safe: the drafter writes, the others verify; eager: branch at uncertain tokens, then vote; "
                "route: a trained head picks the member that writes each token (FusionRoute).", choices=tuple(POLICIES))
# Every policy's options, each once, in the order the policies declare them.
POLICY_OPTIONS: dict[str, Option] = by_name(o for cls in POLICIES.values() for o in cls.options)


@with_options(*POLICY_OPTIONS.values())
class PolicyConfig:
    """The values of every policy's options (:data:`POLICY_OPTIONS`), checked at the edge."""

    @property
    def gating(self) -> Gate:
        """SAFE's confidence gate from ``gate`` and ``gate_entropy`` (both None: faithful SAFE)."""
        return Gate(self.gate, self.gate_entropy)  # type: ignore[attr-defined]


def policies_reading(option: Option) -> list[str]:
    """The names of the policies that read ``option``."""
    return [name for name, cls in POLICIES.items() if option in cls.options]


__all__ = ["POLICIES", "POLICY", "POLICY_OPTIONS", "ContextFull", "Piece", "Policy", "PolicyConfig", "PolicyStats",
           "make_policy", "policies_reading"]


def make_policy(name: str, members: Sequence[Member], config: PolicyConfig, sampling: Sampling, rng: np.random.Generator) -> Policy:
    """Build the named policy over ``members`` (the first member drafts / is the single model)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UsageError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}") from None
    return cls(members, config, sampling, rng)
