"""Options declared once: name, type, default, allowed values and help text in one :class:`Option`.

Everything else derives from the declarations: the command-line flags (``cli/flags.py`` builds them in a loop), the
config-file keys and their checks (``calibration.py``, ``config.py``), the API's keyword arguments and their checks
(:class:`~edge_ensemble.ensemble_config.EnsembleConfig`, :meth:`~edge_ensemble.api.Ensemble.stream`), the server's
request fields and the frozen dataclasses that hold the values (fields made with :func:`option`). Each policy
declares its own options (its ``Options`` dataclass, e.g. ``SafeOptions``); the generation and load options every
ensemble has are declared here.

Every error is one line naming the option as the user wrote it (``--gate``, ``config file …: gate`` or
``gate``), what it must be and the value given::

    --gate must be a number between 0.0 and 1.0 or "off"; got 2.0
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from .errors import UsageError

OFF = "off"  # how the command line and the config file spell an option that is switched off (None in Python)
_OFF_TEXT = f'"{OFF}"'


@dataclass(frozen=True)
class Option:
    """One option. ``type`` is int, float, str, bool or tuple (a list of ``item``); ``range`` holds the
    inclusive bounds of a number (of each item for a tuple); ``off``: None switches the option off."""

    name: str  # the API keyword and the field of the dataclasses that hold it
    type: type
    default: Any
    help: str
    range: tuple[float, float] | None = None
    above: bool = False  # the lower bound itself is not allowed (top_p > 0, weights > 0)
    choices: tuple[str, ...] = ()
    choices_of: Callable[[], Sequence[str]] | None = None  # choices known only at run time (registered policies)
    off: bool = False
    item: type | None = None  # the item type of a tuple option
    alias: str = ""  # the config key and flag when they differ from the name (n_threads -> threads)
    shown_default: str = ""  # how --help shows a default that is not a plain value ("all cores")
    cli: bool = True  # False: an API-only option, without flag or config key
    per_call: bool = True  # False: fixed when the models load (a call or a server request may not change it)
    metavar: str = ""  # how --help names the value when not by its type (FILE)
    # Words that stand for values (vote's gate: "always" = 0, "never" = None), accepted wherever a value is given.
    named: tuple[tuple[str, Any], ...] = ()

    @property
    def allowed_choices(self) -> tuple[str, ...]:
        """The values a string option may take (empty: any string)."""
        return tuple(self.choices_of()) if self.choices_of is not None else self.choices

    @property
    def key(self) -> str:
        """The config-file key (the flag is this with dashes)."""
        return self.alias or self.name

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def nullable(self) -> bool:
        """None is a value: the option is off, or None is its default (seed: random, n_threads: all cores)."""
        return self.off or self.default is None

    def allowed(self, off_text: str = "None") -> str:
        """What a value must be, e.g. ``a whole number between 1 and 64`` (``off_text``: how None is spelled)."""
        if self.type is bool:
            text = "true or false"
        elif self.allowed_choices:
            text = "one of " + ", ".join(self.allowed_choices)
        elif self.item is str:
            text = "a string or a list of strings"
        elif self.type is str:
            text = "a string"
        else:
            number = "a whole number" if int in (self.type, self.item) else "a number"
            text = number if self.type is not tuple else f"a list of {number.split(' ', 1)[1]}s"
            if self.range is not None:
                text += " " + self.bounds()
            if self.type is tuple:  # (an example inside the range: gates are at most 1)
                text += " (e.g. 2,1)" if self.range is None or self.range[1] >= 2 else " (e.g. 0.3,0.5)"
        words = "".join(f" or {w}" for w, _ in self.named)
        return text + words + (f" or {off_text}" if self.off else "")

    def bounds(self) -> str:
        """The range of a number, e.g. ``between 1 and 64`` ("" for an option without one)."""
        if self.range is None:
            return ""
        lo, hi = self.range
        if self.above:
            return f"above {lo}" if math.isinf(hi) else f"above {lo} and at most {hi}"
        return f"at least {lo}" if math.isinf(hi) else f"between {lo} and {hi}"

    @property
    def default_text(self) -> str:
        """The default as ``--help`` shows it."""
        if self.shown_default:
            return self.shown_default
        if self.type is bool:
            return "on" if self.default else "off"
        return OFF if self.default is None else str(self.default)

    # -- parsing and checking ---------------------------------------------------------------------------------

    def check(self, value: Any, where: str | None = None, *, off_text: str = "None") -> Any:
        """``value`` checked and normalised (ints become floats for a float option, lists become tuples);
        a :class:`UsageError` naming ``where`` (default: the name), the allowed values and ``value`` if bad."""
        if value is None and self.nullable:
            return None
        if isinstance(value, str) and self.named:
            word = value.strip().lower()
            for w, v in self.named:
                if w == word:
                    return v
        normal = self._normal(value)
        if normal is _BAD:
            raise UsageError(f"{where or self.name} must be {self.allowed(off_text)}; got {value!r}")
        return normal

    def from_config(self, value: Any, where: str) -> Any:
        """A config-file (TOML) value: like :meth:`check`, with ``"off"`` for None."""
        if self.off and isinstance(value, str) and value.strip().lower() == OFF:
            return None
        return self.check(value, where, off_text=_OFF_TEXT)

    def from_text(self, text: Any, where: str | None = None) -> Any:
        """A command-line value (a string; click has already made bools and repeated options)."""
        where = where or self.flag
        if not isinstance(text, str) or self.type in (str, bool) or self.item is str:
            return self.check(text, where, off_text=_OFF_TEXT)
        if self.off and text.strip().lower() == OFF:
            return None
        if text.strip().lower() in dict(self.named):
            return self.check(text, where, off_text=_OFF_TEXT)
        convert = self.item if self.type is tuple else self.type
        try:
            value: Any = (tuple(convert(v) for v in text.split(",")) if self.type is tuple  # type: ignore[misc]
                          else convert(text.strip()))  # type: ignore[misc]
        except ValueError:
            raise UsageError(f"{where} must be {self.allowed(_OFF_TEXT)}; got {text!r}") from None
        return self.check(value, where, off_text=_OFF_TEXT)

    def _normal(self, value: Any) -> Any:
        """The normal form of ``value``, or ``_BAD``."""
        if self.type is tuple:
            items = (value,) if self.item is str and isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or (self.item is not str and not items):
                return _BAD
            normal = tuple(self._scalar(v, self.item) for v in items)  # type: ignore[arg-type]
            return _BAD if _BAD in normal else normal
        return self._scalar(value, self.type)

    def _scalar(self, value: Any, kind: type) -> Any:
        if kind is bool:
            return value if isinstance(value, bool) else _BAD
        if kind is str:
            return value if isinstance(value, str) and (not self.allowed_choices or value in self.allowed_choices) else _BAD
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            return _BAD  # True is an int to Python, never a number to a user
        value = kind(value)
        if not math.isfinite(value):
            return _BAD
        if self.range is not None:
            lo, hi = self.range
            if not (lo < value if self.above else lo <= value) or not value <= hi:
                return _BAD
        return value


_BAD: Any = object()  # what _normal returns for a value that is not allowed (None can be a good value)


class LiveOptions(Mapping[str, Option]):
    """An option table built anew by ``build`` at each use: the tables that hold every policy's options (a policy
    plugin may register after the table was made)."""

    def __init__(self, build: Callable[[], Mapping[str, Option]]) -> None:
        self._build = build

    def __getitem__(self, name: str) -> Option:
        return self._build()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())


def by_name(options: Iterable[Option]) -> dict[str, Option]:
    """``{name: option}``, each option once (two policies may declare the same option object)."""
    out: dict[str, Option] = {}
    for o in options:
        if out.setdefault(o.name, o) is not o:
            raise TypeError(f"two different options are called {o.name}")  # a declaration error, not a user's
    return out


def check_names(given: Iterable[str], valid: Mapping[str, Option], *, elsewhere: Iterable[str] = (),
                hint: str = "") -> None:
    """Refuse keyword arguments that are not options here, with one line: names in ``elsewhere`` are options
    of another call (``hint`` says which), any other unknown name gets the list of valid ones."""
    given = set(given)
    misplaced = sorted(given & set(elsewhere))
    if misplaced:
        raise UsageError(f"{', '.join(misplaced)}: {hint}")
    unknown = sorted(given - set(valid))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


T = TypeVar("T")


# The key of an Option declaration in a dataclass field's metadata.
_OPTION = "edge_ensemble.option"


def option(declaration: Option) -> Any:
    """A dataclass field that holds the option ``declaration`` declares (its default is the declaration's): a
    policy's ``Options``, the load options, the generation settings and the server's limits are made of these,
    so their fields are real, typed fields and their checks, flags and keys still come from one declaration."""
    return field(default=declaration.default, metadata={_OPTION: declaration})


def declarations(options_class: type, *, every_field: bool = True) -> tuple[Option, ...]:
    """The :class:`Option` declarations of a dataclass made with :func:`option` fields, in field order; with
    ``every_field`` (a policy's ``Options``) a field without one is a declaration error."""
    out = []
    for f in dataclasses.fields(options_class):
        decl = f.metadata.get(_OPTION)
        if decl is None and not every_field:
            continue
        if not isinstance(decl, Option) or decl.name != f.name:
            raise TypeError(f"{options_class.__qualname__}.{f.name}: declare it with option(Option({f.name!r}, ...))")
        out.append(decl)
    return tuple(out)


def replace_checked(instance: T, options: Mapping[str, Option], where: Callable[[str], str] = str) -> T:
    """``instance`` with every option field checked and normalised; ``where(name)`` names a bad one."""
    return dataclasses.replace(instance, **{  # type: ignore[type-var]
        name: o.check(getattr(instance, name), where(name)) for name, o in options.items()})


def checked_sweep(instance: T, options: Sequence[Option], where: Callable[[str], str] = str) -> T:
    """A calibration sweep (``instance``'s fields: ``options``) checked by :func:`replace_checked`; a list that
    gives a value twice (``0.5,0.5``, ``1,1.0``) would be two settings of one name, so it is refused."""
    checked = replace_checked(instance, {o.name: o for o in options}, where)
    for o in options:
        values = getattr(checked, o.name)
        if isinstance(values, tuple) and len(set(values)) != len(values):
            raise UsageError(f"{where(o.name)}: {','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}"
                             " repeats a value; give each once")
    return checked


# -- the options every ensemble has: each answer's, and each model's at load ------------------------------------

GENERATION_OPTIONS: tuple[Option, ...] = (
    # 512: long enough for the step-by-step answers small models write (GSM8K solutions often pass 256
    # tokens, see docs/results.md), short enough to end in about 20 s at this CPU's 25 tokens/s.
    Option("max_tokens", int, 512, "Most tokens per answer.", range=(1, 1 << 20)),
    Option("stop", tuple, (), "Stop the answer before this text (repeat it for several).", item=str,
           shown_default="none"),
    Option("temperature", float, 0.0, "Sampling temperature, 0 = greedy.", range=(0.0, 5.0)),
    Option("top_p", float, 1.0, "Nucleus sampling: sample from the most likely tokens holding this much mass.",
           range=(0.0, 1.0), above=True),
    Option("top_k", int, 0, "Sampling: sample from the k most likely tokens, 0 = all.", range=(0, 1 << 20)),
    Option("seed", int, None, "Random seed for sampling.", range=(0, 2**63 - 1), shown_default="random"),
)

LOAD_OPTIONS: tuple[Option, ...] = (
    Option("n_ctx", int, 4096, "Context window of each member, in tokens.", range=(64, 1 << 20)),
    Option("n_threads", int, None, "CPU threads per model.", range=(1, 1024), alias="threads",
           shown_default="all cores"),
    Option("n_gpu_layers", int, 0, "Layers offloaded to the GPU, -1 = all.", range=(-1, 100000), alias="gpu_layers"),
    Option("flash_attn", bool, False, "Flash attention."),
    Option("control_tokens_in_messages", bool, False,
           "Let control-token text typed in a message (e.g. <|im_start|>) become a real control token, as "
           "llama-cpp-python does; it lets a message forge turns (off: messages are plain text)."),
    Option("parallel", int, 1, "Answers made at once (the server's concurrent requests; in eval and calibrate, "
           "items whose answers are decoded together, batched, for single, every-token and SAFE: faster per "
           "answer on a CPU, with seconds per answer then shared): each member's context gets that many "
           "sequences and n_ctx cells for each.", range=(1, 64)),
    Option("check_memory", bool, True, "Refuse models that would not fit in memory, before loading them.", cli=False),
)
GENERATION = by_name(GENERATION_OPTIONS)
# The context of evaluations (eval, calibrate, route train): the one their recorded runs used, kept so that a
# resumed or repeated run measures the same thing.
EVAL_N_CTX = 2048
LOAD = by_name(LOAD_OPTIONS)
