"""edge-ensemble: several local GGUF models write one answer together, token by token.

Public names (imported lazily so that `import edge_ensemble` stays cheap):
``Ensemble``, ``GenerationResult``, ``GenerationStats``, ``Event``, ``EdgeEnsembleError``, ``train_router``
(FusionRoute's head, :mod:`edge_ensemble.route_train`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Ensemble", "GenerationResult", "GenerationStats", "Event", "EdgeEnsembleError", "train_router"]

if TYPE_CHECKING:  # pragma: no cover
    from .api import Ensemble
    from .engine import Event, GenerationResult, GenerationStats
    from .errors import EdgeEnsembleError
    from .route_train import train_router


def __getattr__(name: str) -> Any:
    if name == "Ensemble":
        from .api import Ensemble

        return Ensemble
    if name in ("GenerationResult", "GenerationStats", "Event"):
        from . import engine

        return getattr(engine, name)
    if name == "EdgeEnsembleError":
        from .errors import EdgeEnsembleError

        return EdgeEnsembleError
    if name == "train_router":
        from .route_train import train_router

        return train_router
    raise AttributeError(name)
