"""The web page at ``/`` (a chat that shows who wrote each token, docs/web.md) and what it asks the server first:
the files shipped in ``web/`` (plain HTML, CSS and JavaScript: no build step, nothing fetched from elsewhere) and
the ensemble's description (``GET /v1/edge_ensemble``: its members, its policy and the policies a request may name).

The page itself is served without the API key (it holds no data); every call it makes to ``/v1`` needs it.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from ..options import declarations
from ..policies import registry
from .requests import PROVENANCE_TOP, served_policies, server_only

if TYPE_CHECKING:
    from ..api import Ensemble

# The page's files by their URL path, with their media type: nothing else under /static is served.
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/static/page.css": ("page.css", "text/css; charset=utf-8"),
         "/static/page.js": ("page.js", "text/javascript; charset=utf-8")}


def read(path: str) -> tuple[bytes, str]:
    """The bytes and media type of the page's file at URL ``path`` (a key of :data:`FILES`)."""
    name, media = FILES[path]
    return resources.files(__package__).joinpath("web", name).read_bytes(), media


def describe(ensemble: "Ensemble", model_id: str) -> dict[str, Any]:
    """The ensemble as the page shows it: members (the drafter first), the policy of a request that names
    none, and each policy a request may name with its summary, the options a request may set and its
    capabilities (branches: it shows samples; logprobs: its tokens carry candidates)."""
    own = server_only()
    policies = []
    for name in served_policies(ensemble):
        cls = registry.get(name)
        policies.append({"name": name, "summary": cls.summary, "branches": cls.branches, "logprobs": cls.logprobs,
                         "options": [o.name for o in declarations(cls.Options) if o.name not in own]})
    return {"object": "edge_ensemble.info", "model": model_id,
            "members": [{"name": m.name, "role": m.role, "architecture": m.architecture} for m in ensemble.members],
            "policy": ensemble.config.policy, "policies": policies, "provenance_top": PROVENANCE_TOP}
