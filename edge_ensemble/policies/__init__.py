"""Decoding policies, one module each, registered in :mod:`edge_ensemble.policies.registry`.

:class:`Policy` (``base.py``) is what a policy module fills in; :func:`registry.get` is the one place that maps a
policy name to its class. ``docs/writing-a-policy.md`` walks a new one from nothing to ``run --policy NAME``.
"""

from __future__ import annotations

from ..options import Option
from . import registry
from .base import (ContextFull, EvalConfig, LoadNeeds, MemberFile, NoOptions, Piece, Policy, PolicyStats,
                   Progress, SecondPass, TokenLogprob, declarations, option)
from .registry import BASELINE_POLICY, DEFAULT_POLICY, register


# The policy option: its choices are the registered policies, whenever they are asked for.
POLICY = Option("policy", str, DEFAULT_POLICY, "The decoding policy.", choices_of=registry.names)


def policy_help() -> str:
    """Every registered policy and its summary, for help texts: ``single: the first member alone; ...``."""
    return "; ".join(f"{name}: {summary}" for name, summary in registry.summaries())


__all__ = ["BASELINE_POLICY", "DEFAULT_POLICY", "POLICY", "ContextFull", "EvalConfig", "LoadNeeds", "MemberFile",
           "NoOptions", "Piece", "Policy", "PolicyStats", "Progress", "SecondPass", "TokenLogprob", "declarations", "option", "policy_help",
           "register", "registry"]

