"""What shapes an ensemble, by option name: :class:`EnsembleConfig`, and the tables of the options an ensemble and a
call may be given (:data:`ENSEMBLE_OPTIONS`, :data:`CALL_OPTIONS`), read from the policy registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import UsageError
from .options import GENERATION, LOAD, LiveOptions, Option, check_names
from .policies import POLICY, registry


# What an ensemble is made with: its policy, every policy's options (a call may override those) and the load
# options (fixed once the models are loaded).
ENSEMBLE_OPTIONS: Mapping[str, Option] = LiveOptions(lambda: {"policy": POLICY, **registry.policy_options(), **LOAD})
# What one call (stream / generate) may set: the generation options, and the policy with its options.
CALL_OPTIONS: Mapping[str, Option] = LiveOptions(lambda: {**GENERATION, "policy": POLICY, **registry.policy_options()})


@dataclass(frozen=True, init=False)
class EnsembleConfig:
    """Everything that shapes an ensemble, by option name (:data:`ENSEMBLE_OPTIONS`): the policy, the values given
    for policy options (each policy reads its own, :meth:`policy_options`) and the load options. Checked once by
    :meth:`validate`. ``EnsembleConfig(gate=None, n_ctx=2048)``; ``dataclasses.replace(cfg, gate=0.3)`` works.

    ``gate=None`` is faithful SAFE (every chunk verified); ``union_k`` is the number of candidates each member
    adds to the union (sampling's ``top_k`` is a per-call option)."""

    given: Mapping[str, Any]  # the options given, by name (those not given take their policy's default)

    def __init__(self, given: Mapping[str, Any] | None = None, **options: Any) -> None:
        values = {**(given or {}), **options}
        check_names(values, ENSEMBLE_OPTIONS)
        object.__setattr__(self, "given", values)

    def __getattr__(self, name: str) -> Any:
        # A policy option's value: as given, else the default of the policy that reads it. (Fields and the
        # properties below never come here.)
        given = self.__dict__.get("given", {})
        if name in given:
            return given[name]
        decl = registry.declaration(name, given.get("policy", POLICY.default))
        if decl is None:
            raise AttributeError(f"EnsembleConfig has no option {name!r}")
        return decl.default

    def _load(self, name: str) -> Any:
        return self.given.get(name, LOAD[name].default)

    @property
    def policy(self) -> str:
        return self.given.get("policy", POLICY.default)

    @property
    def n_ctx(self) -> int:
        return self._load("n_ctx")

    @property
    def n_threads(self) -> int | None:
        return self._load("n_threads")

    @property
    def n_gpu_layers(self) -> int:
        return self._load("n_gpu_layers")

    @property
    def flash_attn(self) -> bool:
        return self._load("flash_attn")

    @property
    def control_tokens_in_messages(self) -> bool:
        return self._load("control_tokens_in_messages")

    @property
    def parallel(self) -> int:
        return self._load("parallel")

    @property
    def check_memory(self) -> bool:
        return self._load("check_memory")

    def validate(self, n_members: int, where: Callable[[str], str] = str) -> "EnsembleConfig":
        """This config with every value checked and normalised; a :class:`UsageError` names the allowed values
        and the value given (``where(name)``: how the user wrote the option, e.g. its flag). A policy option is
        checked as the chosen policy declares it (another policy's, for a name the chosen one does not read)."""
        if n_members < 1:
            raise UsageError("an ensemble needs at least one member")
        policy = POLICY.check(self.policy, where("policy"))
        checked = {}
        for name, value in self.given.items():
            decl = POLICY if name == "policy" else LOAD.get(name) or registry.declaration(name, policy)
            assert decl is not None  # (the constructor refused names that are no option)
            checked[name] = decl.check(value, where(name))
        cfg = EnsembleConfig(checked)
        weights = checked.get("weights")
        if weights is not None and len(weights) != n_members:
            raise UsageError(f"{where('weights')}: give one per member ({n_members}); got {len(weights)}")
        registry.get(policy).check(cfg.policy_options(), n_members, where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Every option's value by name: as given, else its default (a policy option: the chosen policy's)."""
        return {name: getattr(self, name) for name in ENSEMBLE_OPTIONS}

    def policy_options(self, policy: str | None = None) -> Any:
        """The ``Options`` of ``policy`` (default: the chosen one) from the values given."""
        return registry.make_options(policy or self.policy, dict(self.given))
