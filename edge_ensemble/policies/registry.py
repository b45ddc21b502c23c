"""The policy registry: the one place that maps a policy name to its class.

Built-in policies and third-party ones register the same way. The built-ins are the modules in
:data:`BUILTIN_MODULES`, each registering its class with :func:`register` when imported (as ``llm`` loads its
default plugins); a third-party package adds an entry point to the group ``edge_ensemble.policies`` whose value
is its policy class (``mypolicy = "my_package.policy:MyPolicy"``), loaded the first time the registry is read.
A test (or a script) may call :func:`register` itself.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable

from ..errors import UsageError
from ..options import Option
from .base import Policy, declarations

ENTRY_POINT_GROUP = "edge_ensemble.policies"
BUILTIN_MODULES = ("edge_ensemble.policies.single", "edge_ensemble.policies.every_token",
                   "edge_ensemble.policies.safe", "edge_ensemble.policies.eager", "edge_ensemble.policies.route",
                   "edge_ensemble.policies.vote")
# The policy an ensemble uses when nobody chose one (a preset's calibration may choose another), and the one-model
# reference every other policy is measured against (calibrate's "drafter alone").
DEFAULT_POLICY = "safe"
BASELINE_POLICY = "single"

_policies: dict[str, type[Policy]] = {}
_loaded = False


def register(cls: type[Policy], *, replace: bool = False) -> type[Policy]:
    """Add a policy class to the registry (usable as a class decorator). Its name must be new unless
    ``replace``; its options are checked to be declared with :func:`~edge_ensemble.policies.base.option`."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)) or not cls.name:
        raise TypeError(f"{cls!r}: a policy is a subclass of edge_ensemble.policies.Policy with a name")
    if cls.name in _policies and _policies[cls.name] is not cls and not replace:
        raise ValueError(f"a policy called {cls.name!r} is registered already ({_policies[cls.name].__module__})")
    declarations(cls.Options)  # a malformed Options class fails here, not at the first answer
    _policies[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a policy (tests that register a toy policy remove it afterwards)."""
    _policies.pop(name, None)


def _load() -> None:
    """Import the built-in policies, then every entry point of the group (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _policies:  # (a built-in listed as an entry point of this package too)
            continue
        try:
            register(ep.load())
        except Exception as e:  # a broken plugin must not break the program: say which and go on
            from ..errors import warn

            warn(f"policy plugin {ep.name} ({ep.value}) could not be loaded: {e}")


def policies() -> dict[str, type[Policy]]:
    """Every registered policy, by name, built-ins first."""
    _load()
    return dict(_policies)


def names() -> list[str]:
    """The registered policy names."""
    return list(policies())


def get(name: str, where: str = "policy") -> type[Policy]:
    """The policy called ``name``; a one-line :class:`UsageError` naming the registered ones if there is none."""
    found = policies().get(name) if isinstance(name, str) else None
    if found is None:
        raise UsageError(f"{where} must be one of {', '.join(names())}; got {name!r}")
    return found


def option_declarations() -> dict[str, list[tuple[str, Option]]]:
    """Every policy option name -> the (policy, declaration) pairs that declare it (a name may mean different
    things to different policies)."""
    out: dict[str, list[tuple[str, Option]]] = {}
    for name, cls in policies().items():
        for o in declarations(cls.Options):
            out.setdefault(o.name, []).append((name, o))
    return out


def policy_options() -> dict[str, Option]:
    """One declaration per policy option name (the first policy's that declares it): what parses a value given
    before the policy is known; :func:`declaration` gives the one a given policy reads."""
    return {n: pairs[0][1] for n, pairs in option_declarations().items()}


def declaration(option_name: str, policy: str | None) -> Option | None:
    """The declaration of ``option_name`` that ``policy`` reads; for a policy that does not read it (or None),
    the first one; None for a name no policy declares."""
    pairs = option_declarations().get(option_name, [])
    return next((o for p, o in pairs if p == policy), pairs[0][1] if pairs else None)


def policies_reading(option_name: str) -> list[str]:
    """The names of the policies that read an option of that name."""
    return [p for p, _ in option_declarations().get(option_name, [])]


def make_options(policy: str, values: dict[str, Any], where: Callable[[str], str] = str) -> Any:
    """``policy``'s ``Options`` from ``values`` (option name -> value; names it does not read are ignored),
    each checked by the policy's own declaration, then the policy's own check of them together."""
    cls = get(policy)
    kwargs = {o.name: o.check(values[o.name], where(o.name)) for o in declarations(cls.Options) if o.name in values}
    return cls.Options(**kwargs)


def summaries() -> Iterable[tuple[str, str]]:
    """(name, one-line summary) of every policy, for help texts."""
    return [(n, cls.summary) for n, cls in policies().items()]
