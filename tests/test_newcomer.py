"""What a newcomer tripped on (issue 36): each command as the issue wrote it, with the corrected output and exit code.

1. ``run/chat/serve --help`` state the policy a plain run answers with (the preset's calibration), named as
   calibrated; 2. the top-level help states the gate as it is; 3. ``presets`` and ``serve``'s startup line say
   which policy answers; 4. a missing ``$EDGE_ENSEMBLE_CONFIG`` file is refused; 5. an unknown preset is bad usage
   pointing at ``presets``; 6. a one-member SAFE run claims no accepted drafts; 8. ``run --json --show`` is refused;
   9. ``[1 token, ...]`` and the server's access log on stderr. And the loading line on a terminal.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner, Result

from edge_ensemble.cli import cli
from edge_ensemble.cli.common import _loading_line
from edge_ensemble.config import default_text, describe_policy, load_config, resolve_settings, resolve_values
from edge_ensemble.policies import DEFAULT_POLICY, registry
from edge_ensemble.sources import Catalog

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--threads", "1", "--n-ctx", "256"]


def invoke(args: list[str], **kwargs: object) -> Result:
    return CliRunner().invoke(cli, args, terminal_width=200, **kwargs)  # type: ignore[arg-type]


def assert_error(result: Result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def help_entry(output: str, flag: str) -> str:
    """One option's entry in --help (its lines joined)."""
    entries: list[str] = []
    for line in output.split("Options:", 1)[1].splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries:
            entries[-1] += " " + line.strip()
    (entry,) = [e for e in entries if flag in e.split()[:2] or e.split()[0].rstrip(",") == flag]
    return entry


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_ensemble.cli", *args]


def shipped_date(preset: str) -> str:
    return Catalog.load().preset(preset).calibrated["date"][:10]


# -- 1. --help states the default policy as a plain run resolves it ------------------------------------------


@pytest.mark.parametrize("command", ["run", "chat", "serve"])
def test_help_states_the_calibrated_default_policy(command: str) -> None:
    result = invoke([command, "--help"])
    assert result.exit_code == 0, result.output
    entry = help_entry(result.stdout, "--policy")
    resolved = resolve_values({}, load_config())  # what a plain run resolves its settings with
    policy = resolved.values.get("policy", DEFAULT_POLICY)
    assert resolved.origins.get("policy") == "calibration"  # the tiny preset ships a calibration
    expected = f"default: {policy}, calibrated {shipped_date('tiny')} for preset tiny (else {DEFAULT_POLICY})]"
    assert expected in entry and entry.count("default:") == 1, entry
    assert expected == f"default: {default_text('policy', resolved)}]"
    assert "[default: tiny]" in help_entry(result.stdout, "--preset")


def test_help_follows_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'policy = "{DEFAULT_POLICY}"\ngate = 0.7\npreset = "coder"\n')
    monkeypatch.setenv("EDGE_ENSEMBLE_CONFIG", str(config))
    out = invoke(["run", "--help"]).stdout
    assert f"default: {DEFAULT_POLICY}, from {config} (else {DEFAULT_POLICY})]" in help_entry(out, "--policy")
    assert f"default: 0.7, from {config} (else 0.5)]" in help_entry(out, "--gate")
    assert f"[default: coder, from {config}]" in help_entry(out, "--preset")


def test_a_plain_run_answers_with_the_policy_the_help_states(real_models: Callable[[str], Path]) -> None:
    real_models("qwen2.5-coder-0.5b-instruct")
    real_models("smollm2-135m-instruct")
    result = invoke(["run", "--json", "--max-tokens", "2", *FAST, "hi"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    entry = help_entry(invoke(["run", "--help"]).stdout, "--policy")
    assert f"default: {data['policy']}, calibrated {data['config']['calibrated']['date'][:10]}" in entry
    footer = invoke(["run", "--max-tokens", "2", *FAST, "hi"])
    assert f"{data['policy']}, calibrated {shipped_date('tiny')}" in footer.stderr


# -- 2. the top-level help says what the gate is --------------------------------------------------------------


def test_top_level_help_states_the_gate_and_a_plain_runs_policy() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "(the entropy gate)" not in text
    gate = registry.declaration("gate", DEFAULT_POLICY)
    entropy = registry.declaration("gate_entropy", DEFAULT_POLICY)
    assert gate is not None and entropy is not None
    assert f"top-1 probability is below --gate (default {gate.default_text};" in text, text
    assert f"--gate-entropy adds an entropy test, {entropy.default_text} by default" in text, text
    plain = describe_policy(resolve_settings({}, load_config()))
    shipped = Catalog.load().preset("tiny").calibrated["policy"]
    assert plain.startswith(f"{shipped}, calibrated {shipped_date('tiny')} (")  # (a docstring may name it)
    assert f"A plain `run` (no options) answers with preset tiny, policy {plain};" in text, text


# -- 3. presets and serve say which policy answers -------------------------------------------------------------


def test_presets_show_the_policy_a_plain_run_answers_with() -> None:
    result = invoke(["presets"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:4]}
    for name in ("tiny", "coder", "trio"):
        policy = describe_policy(resolve_settings({"preset": name}, load_config()))
        assert f"calibrated {shipped_date(name)}" in policy and policy in rows[name], rows[name]
    assert "POLICY is what `run -p NAME` answers with" in result.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_names_the_calibrated_policy_and_logs_to_stderr(real_models: Callable[[str], Path]) -> None:
    """3: `serve` starts with the policy that answers; 9: the access log goes to stderr with the server's lines."""
    real_models("qwen2.5-coder-0.5b-instruct")
    real_models("smollm2-135m-instruct")
    port = _free_port()
    proc = subprocess.Popen(cli_command("serve", "--port", str(port), *FAST), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env(), text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    plain = describe_policy(resolve_settings({}, load_config()))
    assert (f"serving 'tiny' on http://127.0.0.1:{port}/v1 (Ctrl-C quits; policy {plain}, unless a request names "
            "another)") in err, err
    assert out == ""  # the access log is not mixed into stdout
    assert re.search(r'"GET /health HTTP/1\.1" 200', err), err


# -- 4. a config file named by $EDGE_ENSEMBLE_CONFIG must exist ------------------------------------------------


def test_a_missing_named_config_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "x" / "missing.toml"
    monkeypatch.setenv("EDGE_ENSEMBLE_CONFIG", str(missing))
    assert_error(invoke(["run", "hi"]), 2, f"config file {missing} (named by $EDGE_ENSEMBLE_CONFIG) does not exist",
                 "unset EDGE_ENSEMBLE_CONFIG")
    assert load_config(missing_ok=True).values == {}  # calibrate, about to write it, reads it as empty
    assert load_config(missing).values == {}  # a path given by the program, not named by the user


def test_a_missing_named_config_file_is_refused_from_the_shell(tmp_path: Path) -> None:
    proc = subprocess.run(cli_command("run", "hi"), capture_output=True, text=True, timeout=60,
                          env=env(EDGE_ENSEMBLE_CONFIG=str(tmp_path / "x" / "missing.toml")))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: config file ") and proc.stderr.count("\n") == 1, proc.stderr


# -- 5. an unknown preset is bad usage (exit 2) and points at `presets` ----------------------------------------


def test_an_unknown_preset_is_bad_usage() -> None:
    line = assert_error(invoke(["run", "-p", "tinny", "hi"]), 2, "unknown preset 'tinny' (did you mean tiny?)",
                        "see `edge-ensemble presets`")
    assert "models list" not in line
    from edge_ensemble.cli.common import EnsembleChoice  # eval, calibrate and route train: the same refusal
    from edge_ensemble.errors import UsageError

    with pytest.raises(UsageError, match="unknown preset 'tinny' \\(did you mean tiny\\?\\)"):
        EnsembleChoice("tinny", ()).chosen_preset(Catalog.load())


# -- 6. one member: no drafts were accepted, because nothing was verified --------------------------------------


def test_a_one_member_safe_run_claims_no_accepted_drafts(real_models: Callable[[str], Path]) -> None:
    model = real_models("smollm2-135m-instruct")
    result = invoke(["run", "-m", str(model), "--max-tokens", "6", *FAST, "Name a colour."])
    assert result.exit_code == 0, result.output
    footer = result.stderr.strip().splitlines()[-1]
    assert "drafts accepted" not in footer and f"{DEFAULT_POLICY} with one member" in footer, footer
    data = json.loads(invoke(["run", "--json", "-m", str(model), "--max-tokens", "6", *FAST, "Name a colour."]).stdout)
    assert data["policy"] == DEFAULT_POLICY and data["stats"]["tokens"] > 0
    assert data["stats"]["drafted_tokens"] == 0 and data["stats"]["draft_acceptance_rate"] is None


# -- 8. --json with --show is refused, not silently dropped ----------------------------------------------------


def test_json_with_show_is_refused() -> None:
    assert_error(invoke(["run", "--json", "--show", "hi"]), 2, "--show", "--json", "give one of them")


# -- 9. one token, not "1 tokens" -------------------------------------------------------------------------------


def test_the_figures_line_counts_one_token(tiny_bpe: Path) -> None:
    result = invoke(["run", "-m", str(tiny_bpe), "--max-tokens", "1", *FAST, "Hi"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("[1 token, "), result.stderr


# -- the loading line ------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_loading_line_shows_member_size_and_elapsed_then_goes(tiny_bpe: Path) -> None:
    stream = _Terminal()
    with _loading_line("tiny-bpe", tiny_bpe, stream):
        time.sleep(0.5)
    frames = [f for f in stream.getvalue().split("\r\x1b[2K") if f]
    size = f"{tiny_bpe.stat().st_size / 1e6:,.1f} MB"
    assert len(frames) >= 2 and all(f.startswith(f"loading tiny-bpe ({size}) ") for f in frames), frames
    seconds = [float(re.search(r"(\d+\.\d)s$", f)[1]) for f in frames]  # type: ignore[index]
    assert seconds == sorted(seconds) and seconds[-1] >= 0.2
    assert stream.getvalue().endswith("\r\x1b[2K")  # cleared once loaded
    quiet = io.StringIO()  # not a terminal: nothing at all
    with _loading_line("tiny-bpe", tiny_bpe, quiet):
        pass
    assert quiet.getvalue() == ""


def test_run_shows_a_loading_line_only_on_a_terminal(tiny_bpe: Path, tiny_bpe_b: Path) -> None:
    args = cli_command("run", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--max-tokens", "2", *FAST, "Hi")
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, env=env(), stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    proc.wait(timeout=60)
    assert proc.returncode == 0, seen
    terminal = seen.decode("utf-8", "replace")
    for name, path in (("tiny-bpe", tiny_bpe), ("tiny-bpe-b", tiny_bpe_b)):
        assert re.search(rf"loading {name} \({path.stat().st_size / 1e6:,.1f} MB\) \d+\.\ds", terminal), terminal
    piped = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=60)
    assert piped.returncode == 0 and "loading" not in piped.stderr and "\x1b" not in piped.stderr, piped.stderr
