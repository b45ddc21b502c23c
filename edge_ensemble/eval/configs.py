"""Engine configurations an evaluation compares: each member alone, every-token, faithful and gated SAFE.

The ensemble configurations share one loaded :class:`Ensemble` (only its policy knobs change between
calls); each member alone gets its own single-model ensemble, so its numbers are exactly what a user of that
model alone would see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..api import Ensemble, EnsembleConfig

ENSEMBLE_CONFIGS = {
    # name: (policy, gate)
    "every-token": ("every-token", 0.5),
    "safe": ("safe", None),
    "safe-gated": ("safe", 0.5),
}


@dataclass
class EngineConfig:
    """One named configuration over a loaded ensemble, in the shape :func:`run_eval` expects."""

    name: str
    ensemble: Ensemble
    config: EnsembleConfig

    def generate(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        self.ensemble.config = self.config
        # The ensemble configurations share one loaded Ensemble: without this, the second and third
        # would find the item's prompt already cached by the first and look faster than they are.
        self.ensemble.reset_cache()
        result = self.ensemble.generate(messages=messages, max_tokens=max_tokens)
        s = result.stats
        return {"text": result.text, "tokens": s.tokens, "seconds": s.generation_seconds + s.prompt_seconds,
                "prompt_seconds": s.prompt_seconds, "ensembled_fraction": s.ensembled_fraction,
                "finish_reason": result.finish_reason}


def build_configs(members: Sequence[str], names: Sequence[str] | None, base: EnsembleConfig) -> tuple[list[EngineConfig], list[Ensemble]]:
    """The requested configurations (all when ``names`` is None): ``single:<member>`` for each member, then
    every-token, safe (faithful) and safe-gated. Returns them and the ensembles to close afterwards."""
    ensembles: list[Ensemble] = []
    configs: list[EngineConfig] = []
    wanted = list(names) if names else None
    full = None
    try:
        for spec in members:
            single = Ensemble([spec], config=replace(base, policy="single"), progress=True)
            name = f"single:{single.members[0].name}"
            if wanted is None or name in wanted or "single" in wanted:
                ensembles.append(single)
                configs.append(EngineConfig(name, single, single.config))
            else:
                single.close()
        for name, (policy, gate) in ENSEMBLE_CONFIGS.items():
            if wanted is not None and name not in wanted:
                continue
            if full is None:
                full = Ensemble(list(members), config=base, progress=True)
                ensembles.append(full)
            cfg = replace(base, policy=policy, gate=gate).validate(len(members))
            configs.append(EngineConfig(name, full, cfg))
    except BaseException:
        for e in ensembles:
            e.close()
        raise
    return configs, ensembles
