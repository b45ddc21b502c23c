"""What every registered policy owes the rest of the program, checked for each one the registry holds (a new
policy is checked the moment it registers): its options reach every place a user sets them and refuse bad
values in one line, a one-member ensemble is plain decoding, and its statistics come through."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from edge_ensemble.api import Ensemble, EnsembleConfig
from edge_ensemble.errors import UsageError
from edge_ensemble.options import OFF, Option
from edge_ensemble.policies import declarations, registry

POLICIES = registry.names()
OPTIONS = [(name, o) for name in POLICIES for o in declarations(registry.get(name).Options)]


def _value_text(o: Option) -> tuple[Any, str]:
    """A valid value of ``o`` other than its default where there is one, and how a flag spells it."""
    if o.type is bool:
        return (not o.default), ""
    if o.allowed_choices:
        value = next((c for c in o.allowed_choices if c != o.default), o.default)
        return value, value
    if o.type is str:
        return "x.npz", "x.npz"
    if o.type is tuple:
        return (1.0, 2.0), "1,2"
    lo, hi = o.range or (0, 1)
    value = o.type(hi if o.above else lo)
    return value, str(value)


def _bad(o: Option) -> Any:
    """A value ``o`` refuses, or None where every value of its type is allowed."""
    if o.type is bool:
        return "yes"
    if o.allowed_choices:
        return "no-such-choice"
    if o.range is not None:
        return (o.range[1] + 1,) * 2 if o.type is tuple else o.type(o.range[1] + 1)
    return None


@pytest.mark.parametrize("policy,option", OPTIONS, ids=[f"{p}:{o.name}" for p, o in OPTIONS])
def test_each_option_reaches_flag_config_key_api_and_server(policy: str, option: Option) -> None:
    from edge_ensemble.cli import cli
    from edge_ensemble.config import OPTIONS as CONFIG_KEYS
    from edge_ensemble.server import extension_fields, server_only

    value, text = _value_text(option)
    # the API keyword, checked by the declaration the policy reads, into the policy's own options
    api = EnsembleConfig(policy=policy, **{option.name: value})
    assert getattr(api.policy_options(), option.name) == value
    # the config key and the flag give the same value
    assert CONFIG_KEYS[option.key].from_config(value if value is not None else OFF, "config") == value
    if option.type is not bool:
        assert option.from_text(text) == value
    flags = {p.opts[0] if p.opts else "" for p in cli.commands["run"].params} | {
        o for p in cli.commands["run"].params for o in (*p.opts, *p.secondary_opts)}
    assert option.flag in flags
    # a request to the server may set it, unless it is fixed when the models load
    assert (option.name in extension_fields()) != (option.name in server_only())


@pytest.mark.parametrize("policy,option", [(p, o) for p, o in OPTIONS if _bad(o) is not None],
                         ids=[f"{p}:{o.name}" for p, o in OPTIONS if _bad(o) is not None])
def test_a_bad_value_is_refused_in_one_line_naming_the_option(policy: str, option: Option) -> None:
    with pytest.raises(UsageError) as err:
        EnsembleConfig(policy=policy, **{option.name: _bad(option)}).validate(2)
    message = str(err.value)
    assert "\n" not in message and message.startswith(option.name) and "must be" in message


def _applies(policy: str) -> bool:
    """The one-member identity applies to a policy that needs nothing given (no head file) and makes one answer."""
    cls = registry.get(policy)
    try:
        cls.check(cls.Options(), 1)
    except UsageError:
        return False
    return not cls.branches


@pytest.mark.parametrize("policy", [p for p in POLICIES if _applies(p)])
@pytest.mark.parametrize("prompt", ["Why is the sky blue?", "def add(a, b):", "日本の首都は", "🙂🙃 emoji"])
def test_one_member_is_plain_decoding_and_stats_come_through(policy: str, prompt: str, tiny_bpe) -> None:
    with Ensemble([tiny_bpe], n_ctx=512, check_memory=False) as ens:
        plain = ens.generate(prompt, max_tokens=24, policy="single")
        got = ens.generate(prompt, max_tokens=24, policy=policy)
    assert got.text == plain.text and got.stats.tokens == plain.stats.tokens
    assert got.stats.policy == policy
    figures = registry.get(policy).Stats().figures(0)
    as_dict = got.to_dict()["stats"]
    assert set(figures) <= set(as_dict) and set(figures) == set(got.stats.policy_stats)
    assert isinstance(got.stats.summary(), list)


def test_every_policy_is_registered_with_a_summary_and_well_formed_options() -> None:
    assert {"single", "every-token", "safe", "eager", "route"} <= set(POLICIES)
    for name in POLICIES:
        cls = registry.get(name)
        assert cls.name == name and cls.summary and "\n" not in cls.summary
        assert dataclasses.is_dataclass(cls.Options)
        for offer in cls.eval_configs:  # an eval configuration's options are the policy's own
            assert set(offer.options) <= {o.name for o in declarations(cls.Options)}
    with pytest.raises(UsageError, match=r"^policy must be one of .*; got 'nope'$"):
        EnsembleConfig(policy="nope").validate(1)


def test_no_policy_option_takes_a_name_the_command_line_or_config_file_uses_for_something_else() -> None:
    from edge_ensemble.config import _SELECTION
    from edge_ensemble.options import GENERATION, LOAD

    taken = set(_SELECTION) | {o.key for o in GENERATION.values()} | {o.key for o in LOAD.values()} | {"policy"}
    clashes = sorted({o.key for _, o in OPTIONS} & taken)
    assert not clashes, f"policy options named like selection, generation or load keys: {clashes}"
