"""Showing an answer: the streamed text (with ``--show``, each ensembled token marked with the member that won
it), the line of figures after it, and a branching answer's summary and tree."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import click

from ..api import MemberInfo
from ..config import Calibration
from ..engine import Event, GenerationResult
from ..policies import registry
from .common import _color_ok


class Renderer:
    """Writes a streamed answer to stdout; with ``show``, marks each ensembled token with its winner."""

    PALETTE = ("cyan", "magenta", "yellow", "green", "blue", "red")

    def __init__(self, members: Sequence[str], show: bool) -> None:
        self.show = show
        self.color = show and _color_ok(sys.stdout)
        self.colors = {name: self.PALETTE[i % len(self.PALETTE)] for i, name in enumerate(members)}
        self.at_line_start = True

    def legend(self) -> str:
        if self.color:
            names = ", ".join(click.style(n, fg=c, underline=True) for n, c in self.colors.items())
            return f"ensembled tokens in the colour of the member that won them: {names}"
        return "[text|member]: a token the ensemble chose, and the member that won it (route: wrote it)"

    def write(self, event: Event) -> None:
        text = event.text
        if not text:
            return
        if event.kind == "status":  # a vote's progress: its own line on stderr, between the answers
            self.end_line()
            click.echo(f"[{text}]", err=True)
            return
        if self.show and event.winner is not None:  # a token the members chose (routed: every one, by its writer)
            text = (click.style(text, fg=self.colors.get(event.winner or ""), underline=True) if self.color
                    else f"[{text}|{event.winner}]")
        click.echo(text, nl=False, color=self.color)
        self.at_line_start = event.text.endswith("\n")

    def end_line(self) -> None:
        if not self.at_line_start:
            click.echo()
            self.at_line_start = True


def footer(result: GenerationResult, calibration: Calibration | None = None) -> str:
    """One line of figures after an answer (and the date of the calibration its settings came from)."""
    s = result.stats
    parts = [f"{s.tokens} token{'' if s.tokens == 1 else 's'}", f"{s.tokens_per_second:.1f} tok/s",
             f"E/T {s.ensembled_fraction:.2f}"]
    parts += s.summary()  # the policy's own figures (SAFE: drafts accepted; route: who wrote what)
    alone = len(s.members) == 1 and s.policy in registry.names() and not registry.get(s.policy).drafter_only
    parts.append(f"{s.policy} with one member" if alone else s.policy)
    if calibration is not None and calibration.applied:  # next to the policy, as startup lines name it
        parts.append(f"calibrated {calibration.date[:10] or 'settings'}")
    if result.finish_reason == "length":
        parts.append("cut at max tokens or context")
    return "[" + ", ".join(parts) + "]"


def branch_summary(result: GenerationResult) -> str:
    """One line about a branching answer: how many branches, of which kind, tokens spent, which one won."""
    b = result.branches
    kinds = {k: sum(1 for x in b if x.origin == k) for k in ("entropy", "ensemble", "parallel", "sample")}
    made = ", ".join(f"{n} {k}" for k, n in kinds.items() if n) or "no forks"
    killed = sum(1 for x in b if x.finish_reason == "killed")
    if killed:
        made += f"; {killed} killed"
    chosen = next(x for x in b if x.chosen)
    text_choice = registry.get(result.stats.policy).text_choice if result.stats.policy in registry.names() else None
    why = (f"answer {chosen.answer!r}, {chosen.votes} of {len(b)} votes" if chosen.answer is not None
           else text_choice or f"best mean log-probability {chosen.mean_logprob:.3f}")
    return (f"{len(b)} branches ({made}), {result.stats.generated_tokens} tokens generated; chosen: #{chosen.index}"
            f" ({why})")


def branch_tree(result: GenerationResult) -> list[str]:
    """The branches as a tree: each under the one it forked from, with where it forked and how it ended."""
    children: dict[int | None, list[int]] = {}
    for x in result.branches:
        children.setdefault(x.parent, []).append(x.index)
    lines: list[str] = []

    def walk(i: int, depth: int) -> None:
        x = result.branches[i]
        where = "" if x.parent is None else f" from #{x.parent} at token {x.forked_at} ({x.origin})"
        answer = f", answer {x.answer!r}" if x.answer is not None else ""
        who = f" {x.member}" if x.member and len({y.member for y in result.branches}) > 1 else ""
        conf = f", confidence {x.confidence:.2f}" if x.confidence is not None else ""
        mark = "  <- chosen" if x.chosen else ""
        lines.append(f"{'  ' * depth}#{x.index}{who}{where}: {x.tokens} tokens, {x.finish_reason}{answer}{conf}"
                     f"{mark}")
        for c in children.get(i, []):
            walk(c, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return lines


def _member_dict(m: MemberInfo) -> dict[str, Any]:
    """A member as ``run --json`` and the chat's ``/save`` write it."""
    return {"name": m.name, "role": m.role, "path": str(m.path), "architecture": m.architecture,
            "n_vocab": m.n_vocab, "chat_template": m.chat_template, "size_bytes": m.size_bytes}
