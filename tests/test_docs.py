"""The documentation runs as written: the README is short, the options reference is current, every `edge-ensemble`
command in a shell block of README.md and docs/*.md parses (the cheap ones are run), every Python block compiles,
every script a shell block names exists, and every relative link (and its #anchor) points somewhere."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import click
import pytest
from click.testing import CliRunner

from edge_ensemble.calibration import OPTIONS as CONFIG_OPTIONS
from edge_ensemble.cli import cli
from edge_ensemble.errors import UsageError
from edge_ensemble.eval.calibrate import SWEEP_OPTIONS
from edge_ensemble.policies import registry
from edge_ensemble.server.settings import SERVER_LIMITS

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
SHELL = {"sh", "bash", "console", "shell"}
# Commands run rather than only parsed: they read, load at most a vocabulary (doctor: one short test decode) and
# write nothing.
RUNNABLE = {("models", "list"), ("models", "info"), ("models", "path"), ("presets",), ("doctor",)}
HELP = {"--help", "-h", "--version", "-V"}
# Where a declared option's flag lands in click's parameters (by config key): its value is checked as the
# declaration checks it, so a documented value out of range fails too.
DECLARED = {**{o.key: o for o in CONFIG_OPTIONS.values()}, **{o.key: o for o in (*SERVER_LIMITS, *SWEEP_OPTIONS)}}
SHELL_OPERATORS = {"|", "||", "&&", ";", "&"}


# -- reading the documents ---------------------------------------------------------------------------------------


def blocks(text: str) -> Iterator[tuple[str, int, str]]:
    """(language, first line number, body) of every fenced block."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        yield lang, start + 1, "\n".join(body)
        i += 1


def shell_commands(lang: str, body: str) -> Iterator[tuple[int, str]]:
    """(line offset, command) of a shell block: every line of sh/bash, the ``$ `` lines of console; a line
    ending in a backslash goes on on the next one."""
    lines = body.split("\n")
    i = 0
    while i < len(lines):
        line, offset = lines[i], i
        i += 1
        if lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        yield offset, line


def edge_ensemble_args(tokens: list[str]) -> list[list[str]]:
    """The arguments of every ``edge-ensemble`` in a tokenized command line (after env assignments, taskset, a
    pipe), up to the next shell operator or redirection."""
    out = []
    for i, tok in enumerate(tokens):
        if Path(tok).name != "edge-ensemble":
            continue
        args = []
        for arg in tokens[i + 1:]:
            if arg in SHELL_OPERATORS or re.match(r"^\d?[<>]", arg):
                break
            args.append(arg)
        out.append(args)
    return out


def documented_commands(files: list[Path]) -> Iterator[tuple[str, list[str]]]:
    """(where, tokens) of every command line in the shell blocks of ``files``; a line shlex cannot split is
    yielded with the error as its only token, so that it fails."""
    for path in files:
        for lang, first, body in blocks(path.read_text(encoding="utf-8")):
            if lang not in SHELL:
                continue
            for offset, line in shell_commands(lang, body):
                where = f"{path.name}:{first + offset}: {line.strip()}"
                try:
                    yield where, shlex.split(line, comments=True)
                except ValueError as e:
                    yield where, [f"\0unparsable: {e}"]


# -- checking one edge-ensemble command --------------------------------------------------------------------------


def parse(args: list[str]) -> tuple[str, ...]:
    """Parse ``edge-ensemble ARGS`` as click would, down to the command, without running it; check each declared
    option's value by its declaration. Returns the command path (``("models", "list")``); raises on a bad flag."""
    path: list[str] = []
    command: click.Command = cli
    ctx = command.make_context("edge-ensemble", list(args))
    while isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        name, sub, rest = command.resolve_command(ctx, rest)
        assert name is not None and sub is not None
        path.append(name)
        command, ctx = sub, sub.make_context(name, rest, parent=ctx)
    for key, value in ctx.params.items():
        declared = DECLARED.get(key)
        if declared is not None and value not in (None, ()):
            declared.from_text(value)
    return tuple(path)


def check_command(args: list[str], *, run: bool = True) -> str | None:
    """None when ``edge-ensemble ARGS`` is right: it parses (and, when cheap and ``run``, exits 0); else why not."""
    if any(a.startswith("\0unparsable") for a in args):
        return args[0][1:]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # (--help, --version print while parsing)
            path = parse(args)
    except click.exceptions.Exit as e:  # --help / --version: parsed, and printed already
        return None if e.exit_code == 0 else f"exit {e.exit_code}"
    except (click.ClickException, UsageError) as e:
        return e.format_message() if isinstance(e, click.ClickException) else str(e)
    if not run or not (path[:2] in RUNNABLE or path[:1] in RUNNABLE or HELP & set(args)):
        return None
    result = CliRunner().invoke(cli, args)
    if result.exit_code != 0:
        return f"exit {result.exit_code}: {result.output.strip()[-300:]}"
    return None


def problems(files: list[Path], *, run: bool = True) -> list[str]:
    """Every documented command that is wrong, and every repository script a shell block names that is missing."""
    out = []
    for where, tokens in documented_commands(files):
        for args in edge_ensemble_args(tokens):
            why = check_command(args, run=run)
            if why is not None:
                out.append(f"{where}\n    -> {why}")
        for tok in tokens:
            if re.match(r"^(\./)?(scripts|benchmarks)/[\w./-]+$", tok) and not (ROOT / tok).exists():
                out.append(f"{where}\n    -> no such file in the repository: {tok}")
    return out


# -- the documents as they are -----------------------------------------------------------------------------------


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def test_the_options_reference_is_current() -> None:
    # (a fresh interpreter: a test that registers a toy policy must not change what is generated)
    done = subprocess.run([sys.executable, "scripts/options_reference.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_stale_options_reference_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("options_reference", ROOT / "scripts" / "options_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = module.render()
    assert "### safe" in current and "`--draft-len`" in current and "`edge_ensemble.gate`" in current
    module.OUT = tmp_path / "docs" / "options.md"  # (relative_to ROOT in its message: keep it under a root)
    module.ROOT = tmp_path
    module.OUT.parent.mkdir()
    module.OUT.write_text(current.replace("`--draft-len`", "`--draft-length`"), encoding="utf-8")
    assert module.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "docs/options.md is not current" in err
    assert module.main([]) == 0 and module.main(["--check"]) == 0
    assert module.OUT.read_text(encoding="utf-8") == current

    from test_policy_plugin import MostConfident  # a policy registered later is in the reference by itself

    registry.register(MostConfident)
    try:
        assert "\n### most-confident\n" in module.render() and module.main(["--check"]) == 1
    finally:
        registry.unregister(MostConfident.name)


def test_every_documented_command_parses_and_the_cheap_ones_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # (nothing run may write; if it did, here)
    monkeypatch.chdir(tmp_path)
    found = list(documented_commands(DOCS))
    assert sum(len(edge_ensemble_args(t)) for _, t in found) >= 30  # the extraction itself works
    # docs/writing-a-policy.md runs the policy it writes: the tests' copy of it stands in
    from test_policy_plugin import MostConfident

    registry.register(MostConfident)
    try:
        assert problems(DOCS) == []
    finally:
        registry.unregister(MostConfident.name)


def test_every_python_block_compiles() -> None:
    count = 0
    for path in DOCS:
        for lang, first, body in blocks(path.read_text(encoding="utf-8")):
            if lang == "python":
                compile(body, f"{path.name}:{first}", "exec")
                count += 1
    assert count >= 5


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and (m := re.match(r"^#{1,6} (.+)", line)):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_every_relative_link_and_anchor_exists() -> None:
    bad = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                bad.append(f"{path.name}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                bad.append(f"{path.name}: {target}: no such heading")
    assert bad == []


@pytest.mark.usefixtures("llama_quiet")
def test_the_readme_python_example_runs(real_models, capsys: pytest.CaptureFixture[str]) -> None:
    for key in ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"):
        real_models(key)  # (fails with the pull command when they are not there)
    [example] = [body for lang, _, body in blocks((ROOT / "README.md").read_text(encoding="utf-8"))
                 if lang == "python" and "from edge_ensemble import Ensemble" in body]
    exec(compile(example, "README.md", "exec"), {})
    text, figures, provenance = capsys.readouterr().out.strip().split("\n")
    assert text and figures.startswith("safe ") and provenance.startswith("[(")


# -- the checks themselves catch what they must ------------------------------------------------------------------


SYNTHETIC = '''
```sh
edge-ensemble run --policy safe --gate off --weights 2,1 "fine"
edge-ensemble run --no-such-flag "x"   # an unknown flag
```

```console
$ printf 'hi\\n' | NO_COLOR=1 edge-ensemble chat --draft-len 0
output lines are not commands: edge-ensemble --bogus
$ taskset -c 0 edge-ensemble eval gsm8k --configs single \\
      --no-such-eval-flag 3
$ edge-ensemble no-such-command
$ edge-ensemble models pull
$ python benchmarks/no_such_script.py
```
'''


def test_the_command_check_refuses_unknown_flags_commands_and_values(tmp_path: Path) -> None:
    doc = tmp_path / "synthetic.md"
    doc.write_text(SYNTHETIC, encoding="utf-8")
    found = problems([doc], run=False)
    assert len(found) == 6, "\n".join(found)
    joined = "\n".join(found)
    assert "No such option '--no-such-flag'" in joined
    assert "--draft-len must be a whole number between 1 and 64" in joined
    assert "No such option '--no-such-eval-flag'" in joined
    assert "No such command 'no-such-command'" in joined
    assert "Missing argument" in joined
    assert "no such file in the repository: benchmarks/no_such_script.py" in joined
    assert "fine" not in joined and "--bogus" not in joined
