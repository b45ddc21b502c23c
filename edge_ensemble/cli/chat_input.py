"""What ``chat`` reads: one typed line, or a multi-line message (a bracketed paste, a ``\"\"\"`` block) as one entry.

On a terminal a paste of several lines is one message. Terminals mark a paste when the program asks them to
(bracketed paste, mode 2004): GNU readline does that itself once ``enable-bracketed-paste`` is on (Python switches it
off) and hands the whole paste back as one line with its newlines; without GNU readline we switch the mode on
ourselves and join what lies between the markers (``ESC[200~`` ... ``ESC[201~``). Anywhere (a terminal or a pipe), a
line that starts with ``\"\"\"`` starts a message that runs to the line that ends with ``\"\"\"``, as in ollama. Other
lines are one entry each, as typed.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import click

from ..errors import UsageError

PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # how a terminal in bracketed-paste mode frames a paste
PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"
BLOCK = '"""'
CONTINUE = "..."  # the prompt of a """ block's further lines


@dataclass(frozen=True)
class Entry:
    """What the user entered: ``text`` (stripped of surrounding blank space), and ``multiline`` for a paste or a
    ``\"\"\"`` block, which is always a message, never a command."""

    text: str
    multiline: bool = False


def prompt_line(text: str) -> str | None:
    """The next line as typed (a GNU readline paste may hold newlines); None at the end of input (Ctrl-D).
    Ctrl-C raises KeyboardInterrupt."""
    try:
        return click.prompt(text, prompt_suffix=" ", default="", show_default=False)
    except click.Abort as e:  # click turns both Ctrl-C and Ctrl-D into Abort; the original is its context
        if isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _is_gnu(readline: Any) -> bool:
    """Whether the readline module is GNU readline (libedit, macOS's, has no bracketed paste)."""
    if "libedit" in (getattr(readline, "__doc__", "") or ""):
        return False
    return getattr(readline, "backend", "readline") == "readline"  # (Python 3.13+ names the library)


@contextlib.contextmanager
def bracketed_paste(stdin: Any = None, stdout: Any = None) -> Iterator[None]:
    """While the chat runs on a terminal, let the terminal mark pastes: through GNU readline where it is loaded
    (it switches the mode on for each line it reads), else by switching the mode on ourselves (and off at the
    end). Not under libedit, which would take the markers for keys (there a paste is a line per message; a
    ``\"\"\"`` block still works). Nothing when stdin or stdout is no terminal: a pipe's lines are read as they are."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if not (_isatty(stdin) and _isatty(stdout)):
        yield
        return
    readline = sys.modules.get("readline")
    if readline is not None:
        if _is_gnu(readline):
            readline.parse_and_bind("set enable-bracketed-paste on")
        yield
        return
    stdout.write(PASTE_ON)
    stdout.flush()
    try:
        yield
    finally:
        stdout.write(PASTE_OFF)
        stdout.flush()


class Reader:
    """Reads entries: :meth:`read` returns the next :class:`Entry`, None at the end of input."""

    def __init__(self, read_line: Callable[[str], str | None] = prompt_line,
                 note: Callable[[str], None] | None = None) -> None:
        self.read_line, self.note = read_line, note or (lambda text: click.echo(text, err=True))

    def read(self) -> Entry | None:
        line = self.read_line(">")
        if line is None:
            return None
        if PASTE_START in line:
            line = self._rest_of_paste(line)
        text = line.strip()
        if text.startswith(BLOCK):  # a """ block, typed or pasted (its lines may all be in this one)
            return self._block(text[len(BLOCK):])
        if "\n" in text:  # a paste (GNU readline's, or between the markers)
            return Entry(_trim(line), True)
        return Entry(text)

    def _rest_of_paste(self, line: str) -> str:
        """``line`` (which holds a paste's start marker) with the paste's further lines, the markers removed."""
        while PASTE_END not in line.split(PASTE_START, 1)[1]:
            more = self.read_line("")
            if more is None:  # the end of input inside a paste: keep what came
                break
            line += "\n" + more
        return line.replace(PASTE_START, "").replace(PASTE_END, "")

    def _block(self, first: str) -> Entry:
        """A ``\"\"\"`` block: ``first`` is what follows the opening quotes; lines follow to one that ends with
        ``\"\"\"``. Ctrl-C discards the block; the end of input inside it is a usage error."""
        first = first.lstrip(" \t")  # (spaces after the opening quotes are not meant as indentation)
        if first.rstrip().endswith(BLOCK):  # """one line""", or a whole block pasted
            return Entry(_trim(first.rstrip()[:-len(BLOCK)]), True)
        lines = [first]
        while True:
            try:
                line = self.read_line(CONTINUE)
            except KeyboardInterrupt:
                click.echo()
                self.note("(the \"\"\" block was discarded)")
                return Entry("", True)
            if line is None:
                raise UsageError('the input ended inside a """ block: end the message with a line that ends '
                                 'with """')
            if PASTE_START in line:
                line = self._rest_of_paste(line)
            if line.rstrip().endswith(BLOCK):
                lines.append(line.rstrip()[:-len(BLOCK)])
                return Entry(_trim("\n".join(lines)), True)
            lines.append(line)


def _trim(text: str) -> str:
    """A multi-line message without blank lines around it and trailing space (the first line's indent stays)."""
    lines = text.rstrip().split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)
