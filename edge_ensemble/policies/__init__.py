"""Decoding policies, one module each, registered in :mod:`edge_ensemble.policies.registry`.

:class:`Policy` (``base.py``) is what a policy module fills in; :func:`registry.get` is the one place that maps a
policy name to its class. ``docs/writing-a-policy.md`` walks a new one from nothing to ``run --policy NAME``.
"""

from __future__ import annotations

from typing import Any

from ..options import Option
from . import registry
from .base import (ContextFull, EvalConfig, LoadNeeds, MemberFile, NoOptions, Piece, Policy, PolicyStats,
                   declarations, option)
from .registry import BASELINE_POLICY, DEFAULT_POLICY, register


def _policy_help() -> str:
    return "; ".join(f"{name}: {summary}" for name, summary in registry.summaries()) + "."


# The policy option: its choices are the registered policies, whenever they are asked for.
POLICY = Option("policy", str, DEFAULT_POLICY, "The decoding policy.", choices_of=registry.names)


def policy_help() -> str:
    """One line per policy for help texts: ``name: summary``."""
    return _policy_help()


def make_policy(name: str, lanes: Any, options: Any, sampling: Any, rng: Any, prepared: Any = None) -> Policy:
    """Build the named policy over ``lanes`` (the first member drafts / is the single model)."""
    return registry.get(name)(lanes, options, sampling, rng, prepared)


__all__ = ["BASELINE_POLICY", "DEFAULT_POLICY", "POLICY", "ContextFull", "EvalConfig", "LoadNeeds", "MemberFile", "NoOptions", "Piece",
           "Policy", "PolicyStats", "declarations", "make_policy", "option", "policy_help", "register", "registry"]


def policies_reading(option: Option) -> list[str]:
    """The names of the policies that read an option of ``option``'s name."""
    return registry.policies_reading(option.name)


def __getattr__(name: str) -> Any:
    # POLICY_OPTIONS: one declaration per policy option name, read from the registry when asked for.
    if name == "POLICY_OPTIONS":
        return registry.policy_options()
    raise AttributeError(name)
