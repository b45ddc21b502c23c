"""The package's structure: no import cycle between its modules (scripts/import_cycles.py), the names of split
modules still importable where they were, no module over 500 lines, no policy named outside ``policies/``, and no
``type: ignore[attr-defined]`` on a holder of options."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edge_ensemble"
MAX_LINES = 500

# Import edges (importer, imported) that close a cycle in files whose owners are still changing them; each must
# be in such a file (cli.py, server.py, runtime.py, engine.py, api.py, policies/). None at present.
KNOWN_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()


def import_cycles() -> ModuleType:
    """scripts/import_cycles.py as a module (scripts/ is no package)."""
    if "import_cycles" not in sys.modules:
        spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["import_cycles"] = module
        spec.loader.exec_module(module)
    return sys.modules["import_cycles"]


def test_no_import_cycle_in_the_package() -> None:
    ic = import_cycles()
    graph = ic.import_graph(PACKAGE)
    found = ic.cycles(graph, ignore=set(KNOWN_CYCLE_EDGES))
    assert not found, "\n".join(ic.describe(graph, c) for c in found)
    for importer, imported in KNOWN_CYCLE_EDGES:  # a known edge that is gone must leave the list
        assert imported in graph[importer], f"{importer} -> {imported} is no longer imported: drop it from the list"


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_cycle_check_counts_imports_inside_functions_and_not_type_checking_ones(tmp_path: Path) -> None:
    ic = import_cycles()
    pkg = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import B\n",
        "pkg/b.py": "B = 1\n\ndef late():\n    from pkg import a\n    return a\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n",
        "pkg/d.py": "from . import c\nD = 1\n",
        "pkg/sub/__init__.py": "from .x import X\n",
        "pkg/sub/x.py": "from .y import Y\nX = Y\n",  # a sibling: pkg.sub's __init__ is already running
        "pkg/sub/y.py": "Y = 1\n",
    })
    graph = ic.import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.a": ["pkg/b.py:4"]}
    assert "pkg.d" not in graph["pkg.c"] and graph["pkg.sub.x"] == {"pkg.sub.y": ["pkg/sub/x.py:1"]}
    assert ic.cycles(graph) == [["pkg.a", "pkg.b"]]
    assert ic.cycles(graph, ignore={("pkg.b", "pkg.a")}) == []
    assert ic.main([str(pkg)]) == 1


def test_a_submodule_importing_from_its_own_package_is_a_cycle(tmp_path: Path) -> None:
    ic = import_cycles()
    pkg = write_package(tmp_path, {"pkg/__init__.py": "from .m import f\nNAME = 1\n",
                                   "pkg/m.py": "def f():\n    from . import NAME\n    return NAME\n"})
    assert ic.cycles(ic.import_graph(pkg)) == [["pkg", "pkg.m"]]


def test_config_reads_the_option_keys_api_declares() -> None:
    """calibration.OPTIONS is built from the option declarations without importing api (api imports it): the
    same options, in the same order, as api.ENSEMBLE_OPTIONS and the generation options give."""
    from edge_ensemble import api, calibration, config
    from edge_ensemble.options import GENERATION_OPTIONS

    want = {o.key: o for o in (*api.ENSEMBLE_OPTIONS.values(), *GENERATION_OPTIONS) if o.cli}
    assert list(calibration.OPTIONS.items()) == list(want.items())
    assert config.OPTIONS is calibration.OPTIONS


@pytest.mark.parametrize("module, names", [
    ("edge_ensemble.eval.calibrate", "DROP_CHECK_EVERY SWEEP_OPTIONS USER_FILE_MAX_TOKENS RULE CalibrationResult Score "
     "Setting Sweep calibrate dev_task dropped_note load_dev_file normalize_text pool select settings sweep_table "
     "within_allowance write_calibration _run_dropping _scores _check_resume _write_manifest"),
    ("edge_ensemble.route_train", "DATA_VERSION GSM8K_MAX MBPP_MAX BETA_GRID L2_GRID Models Split TrainItem "
     "TrainResult build_features describe_items fit_from_features item_features load_models report_markdown split_items "
     "train_router training_items"),
    ("edge_ensemble.config", "KEYS OPTIONS Calibration Generation Settings UserConfig calibration_key load_config "
     "parse_calibration parse_calibrations resolve_settings toml_key"),
    ("edge_ensemble.remote", "SERVER_PREFIX RemoteBackend RemoteError ServerSpec declared_model is_server_spec "
     "parse_server_spec server_model_path"),
    ("edge_ensemble.sources.spec", "SERVER_PREFIX ModelSpec parse_spec resolve"),
    ("edge_ensemble.eval.scoring", "extract_boxed extract_choice_letter extract_gsm8k_answer extract_last_number "
     "extract_math_answer normalize_math_answer normalize_number gsm8k_gold numbers_equal math_equal"),
])
def test_names_of_split_modules_are_importable_where_they_were(module: str, names: str) -> None:
    mod = importlib.import_module(module)
    assert [n for n in names.split() if not hasattr(mod, n)] == []


def modules_over(limit: int = MAX_LINES, package: Path = PACKAGE) -> list[tuple[str, int]]:
    """The package's modules longer than ``limit`` lines, longest first, with their line counts."""
    counts = [(str(p.relative_to(package.parent)), len(p.read_text("utf-8").splitlines()))
              for p in sorted(package.rglob("*.py"))]
    return sorted(((name, n) for name, n in counts if n > limit), key=lambda c: -c[1])


def test_no_module_is_over_500_lines() -> None:
    over = modules_over()
    assert not over, "over 500 lines: " + ", ".join(f"{name} ({n})" for name, n in over)


def test_modules_over_counts_lines(tmp_path: Path) -> None:
    pkg = write_package(tmp_path, {"pkg/__init__.py": "", "pkg/long.py": "x = 1\n" * 501, "pkg/ok.py": "x = 1\n" * 500})
    assert modules_over(package=pkg) == [("pkg/long.py", 501)]


def policy_names_outside_policies(package: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """(module, line, name) of every string literal outside ``policies/`` that is a built-in policy's name (docstrings
    and help texts are prose, not literals the code compares or dispatches on)."""
    import ast

    from edge_ensemble.policies import registry

    names = set(registry.names())
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith("policies/"):
            continue
        tree = ast.parse(path.read_text("utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                    and id(node) not in docstrings):
                found.append((rel, node.lineno, node.value))
    return found


def test_no_policy_is_named_outside_policies() -> None:
    """The engine, API, server, eval, calibrate and CLI read the registry and the policies' capabilities."""
    assert policy_names_outside_policies() == []


def test_the_policy_name_check_finds_a_dispatch(tmp_path: Path) -> None:
    pkg = write_package(tmp_path, {"pkg/__init__.py": '"""safe: a docstring is prose."""\n',
                                   "pkg/engine.py": 'def run(policy):\n    return policy == "eager"\n',
                                   "pkg/policies/__init__.py": 'NAME = "route"\n'})
    assert policy_names_outside_policies(pkg) == [("engine.py", 2, "eager")]


def test_no_option_is_read_through_a_type_ignore() -> None:
    """Options live in real dataclass fields (options.option), so reading one never needs ``type: ignore``."""
    import re

    from edge_ensemble.eval.calibrate import SWEEP_OPTIONS
    from edge_ensemble.options import GENERATION, LOAD
    from edge_ensemble.policies import registry
    from edge_ensemble.server import SERVER_LIMITS

    names = {*registry.policy_options(), *GENERATION, *LOAD, *(o.name for o in (*SWEEP_OPTIONS, *SERVER_LIMITS))}
    read = re.compile(r"\.(" + "|".join(sorted(names)) + r")\b")
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in sorted(PACKAGE.rglob("*.py"))
            for i, line in enumerate(p.read_text("utf-8").splitlines(), 1)
            if "type: ignore[attr-defined]" in line and read.search(line)]
    assert hits == []
