"""Options declared once: the declarations' checks and messages, and that every place that holds or shows an
option (dataclasses, runtime defaults, flags, config keys, --help) follows from them. No models needed."""

from __future__ import annotations

import dataclasses
import math

import pytest
from click.testing import CliRunner

from edge_ensemble.api import CALL_OPTIONS, ENSEMBLE_OPTIONS, EnsembleConfig
from edge_ensemble.cli import cli
from edge_ensemble.config import (COMMAND_OPTIONS, KEYS, OPTIONS, Generation, default_text, load_config,
                                  resolve_values)
from edge_ensemble.engine import GenerationOptions
from edge_ensemble.errors import UsageError
from edge_ensemble.options import GENERATION, LOAD, Option, check_names
from edge_ensemble.policies import declarations, registry
from edge_ensemble.runtime import LoadOptions

DRAFT = Option("draft_len", int, 5, "Tokens drafted per chunk.", range=(1, 64))
GATE = Option("gate", float, 0.5, "Gate.", range=(0.0, 1.0), off=True)
WEIGHTS = Option("weights", tuple, None, "Weights.", item=float, range=(0.0, math.inf), above=True)
STOP = Option("stop", tuple, (), "Stop strings.", item=str)
SHARPEN = Option("sharpen", str, "prefix", "Sharpening.", choices=("prefix", "none"))


def message(option: Option, value: object, **kw: object) -> str:
    with pytest.raises(UsageError) as err:
        option.check(value, **kw)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
    return str(err.value)


def test_check_names_the_allowed_values_and_the_value_given() -> None:
    assert message(DRAFT, 0) == "draft_len must be a whole number between 1 and 64; got 0"
    assert message(DRAFT, 2.5) == "draft_len must be a whole number between 1 and 64; got 2.5"
    assert message(DRAFT, True) == "draft_len must be a whole number between 1 and 64; got True"
    assert message(DRAFT, None) == "draft_len must be a whole number between 1 and 64; got None"
    assert message(GATE, 1.5) == "gate must be a number between 0.0 and 1.0 or None; got 1.5"
    assert message(GATE, float("nan"), where="--gate", off_text='"off"').startswith('--gate must be a number')
    assert message(WEIGHTS, (1, 0)) == "weights must be a list of numbers above 0.0 (e.g. 2,1); got (1, 0)"
    assert message(WEIGHTS, (1, math.inf)).startswith("weights must be")
    assert message(WEIGHTS, []).startswith("weights must be")
    assert message(SHARPEN, "max") == "sharpen must be one of prefix, none; got 'max'"
    from edge_ensemble.policies.route import HEAD
    assert message(HEAD, 3) == "head must be a string; got 3"
    assert message(STOP, [1]) == "stop must be a string or a list of strings; got [1]"


def test_check_normalises() -> None:
    assert GATE.check(1) == 1.0 and isinstance(GATE.check(1), float)
    assert GATE.check(None) is None and WEIGHTS.check(None) is None  # off / the default
    assert WEIGHTS.check([2, 1]) == (2.0, 1.0)
    assert STOP.check("###") == ("###",) and STOP.check(["a", "b"]) == ("a", "b")


def test_text_and_config_values() -> None:
    assert DRAFT.from_text("3") == 3 and GATE.from_text(" Off ") is None and GATE.from_text("0.25") == 0.25
    assert WEIGHTS.from_text("2,1") == (2.0, 1.0)
    with pytest.raises(UsageError, match=r"^--draft-len must be a whole number between 1 and 64; got '2\.5'$"):
        DRAFT.from_text("2.5")
    with pytest.raises(UsageError, match=r'^--gate must be a number between 0\.0 and 1\.0 or "off"; got 2\.0$'):
        GATE.from_text("2")
    assert GATE.from_config("off", "config file c: gate") is None and GATE.from_config(0.6, "x") == 0.6
    with pytest.raises(UsageError, match=r"^config file c: draft_len must be a whole number between 1 and 64; got 'five'$"):
        DRAFT.from_config("five", "config file c: draft_len")


def test_unknown_names_are_listed_with_the_valid_ones() -> None:
    with pytest.raises(UsageError) as err:
        check_names(["draftlen"], {"draft_len": DRAFT, "gate": GATE})
    assert str(err.value) == "unknown option(s) draftlen; valid: draft_len, gate"


def test_the_holders_of_options_are_built_from_the_declarations() -> None:
    # Each policy's Options dataclass: a field per declaration, its default the declaration's.
    for cls in registry.policies().values():
        assert {f.name: f.default for f in dataclasses.fields(cls.Options)} == {
            o.name: o.default for o in declarations(cls.Options)}
    # An EnsembleConfig not given an option reads its declared default (a policy option: the chosen policy's).
    config = EnsembleConfig()
    for name, o in ENSEMBLE_OPTIONS.items():
        declared = registry.declaration(name, config.policy) if name in registry.policy_options() else o
        assert declared is not None and getattr(config, name) == declared.default
    assert {f.name: f.default for f in dataclasses.fields(Generation)} == {o.name: o.default for o in GENERATION.values()}
    # One default for max_tokens: the CLI's, the API's and the engine's are the declaration's.
    assert GenerationOptions().max_tokens == Generation().max_tokens == GENERATION["max_tokens"].default == 512
    for name in ("n_ctx", "n_threads", "n_gpu_layers", "flash_attn", "control_tokens_in_messages"):
        assert getattr(LoadOptions(), name) == LOAD[name].default
    assert not hasattr(LoadOptions(), "seed")  # nothing read it


def test_each_policy_declares_what_it_reads() -> None:
    policies = registry.policies()
    assert declarations(policies["single"].Options) == ()
    assert {o.name for o in declarations(policies["every-token"].Options)} == {"union_k", "weights"}
    assert registry.policies_reading("union_k") == ["every-token", "safe", "eager"]
    assert registry.policies_reading("max_branches") == ["eager"]
    assert registry.policies_reading("draft_len") == ["safe"]
    # The union size has its own name; top_k is sampling's, per call, and nowhere a policy option.
    assert "top_k" not in registry.policy_options() and "top_k" not in ENSEMBLE_OPTIONS and "top_k" in CALL_OPTIONS
    assert set(CALL_OPTIONS) & set(LOAD) == set()


def test_run_help_shows_each_option_with_its_default_and_range_once() -> None:
    result = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    entries: list[str] = []  # one per option: its first line and the help lines under it
    for line in result.output.split("Options:", 1)[1].splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries:
            entries[-1] += " " + line.strip()
    resolved = resolve_values({}, load_config())  # the default a plain run has (a preset's calibration: the policy)
    for key, option in {**OPTIONS, **COMMAND_OPTIONS}.items():  # (COMMAND_OPTIONS: --log/--no-log)
        (entry,) = [e for e in entries if e.split()[0] in (option.flag, f"{option.flag}/")]
        assert entry.count("default:") == 1 and f"default: {default_text(key, resolved)}]" in entry, entry
        assert option.default_text in entry.rsplit("default:", 1)[1], entry  # the built-in one (else ...) too
        if option.range is not None:
            assert entry.count(option.bounds()) == 1, entry
    assert "check-memory" not in result.output  # API-only
    assert set(KEYS) == {"preset", "members", "system", *OPTIONS, *COMMAND_OPTIONS}


def test_config_keys_are_the_flags_with_underscores() -> None:
    assert OPTIONS["threads"].name == "n_threads" and OPTIONS["threads"].flag == "--threads"
    assert OPTIONS["union_k"].flag == "--union-k"
    assert "check_memory" not in OPTIONS
