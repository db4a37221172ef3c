"""The argument parser of the ``granet`` command: one-line errors, boolean flags, plain help, lazy sub-commands.

* **Errors are one line** naming the value (the usage is one ``--help`` away).
* **Boolean flags** take every form users of argparse, Lightning and Hugging Face expect:
  ``--overwrite``, ``--no-overwrite``, ``--overwrite true`` (the form of old scripts) and
  ``--overwrite=false``. A flag takes the next word as its value only when that word is a boolean
  (true/false, yes/no, on/off, 1/0; ``none`` too where the option may be unset), so
  ``granet evaluate --json RUN_DIR`` leaves ``RUN_DIR`` to the positional argument.
* **Help is plain text**: the help strings come from docstrings and field metadata written for
  Sphinx; their markup (````None````, ``:class:`~granet.sparsity.config.SparsityConfig```) is rendered as
  the words a reader sees (```None```, ```SparsityConfig```) when the parser is built.
* **Sub-commands are built when used**: a sub-command's options (and the heavy modules they
  describe: torch, the registries) are added only when that sub-command is parsed, so
  ``granet --help`` imports neither.
"""
from __future__ import annotations

import argparse
import re
import sys
import typing
from typing import Any, Callable, Optional, Sequence

TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")
UNSET = ("none", "null")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name if it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_bool(text: str, optional: bool = False) -> Optional[bool]:
    """``true``/``false`` (also yes/no, on/off, 1/0; any case) → bool; ``none``/``null`` → None if ``optional``."""
    lowered = text.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    if optional and lowered in UNSET:
        return None
    expected = "true/false" + ("/none" if optional else "")
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


# ---------------------------------------------------------------------------------------- plain help

_ROLE = re.compile(r":(?:[a-z]+:)?([a-z]+):`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.S)
_TITLED = re.compile(r"(.*?)\s*<([^>]+)>", re.S)


def _role(match: "re.Match[str]") -> str:
    role, target = match.group(1), match.group(2)
    titled = _TITLED.fullmatch(target)
    if titled:
        return f"`{titled.group(1)}`"
    if target.startswith("~"):  # Sphinx shows the last component
        target = target[1:].rsplit(".", 1)[-1]
    target = target.lstrip("!.")
    if role in ("func", "meth") and not target.endswith(")"):
        target += "()"
    return f"`{target}`"


def plain(text: Optional[str]) -> Optional[str]:
    """Sphinx markup as the words it renders to: roles and double backticks become single backticks.

    ``:class:`~granet.sparsity.config.SparsityConfig``` → ```SparsityConfig```, ``:func:`f``` → ```f()```,
    ````None```` → ```None```, a literal-block marker ``text::`` → ``text:``.
    """
    if not text:
        return text
    text = _ROLE.sub(_role, text)
    text = _LITERAL.sub(lambda m: f"`{m.group(1)}`", text)
    text = re.sub(r"(?m)^\s*::\s*$\n?", "", text)  # a literal-block marker on its own line
    return re.sub(r"(?m)(\S)::$", r"\1:", text)


# ---------------------------------------------------------------------------------------- boolean flags


class BoolFlag(argparse.Action):
    """A boolean option: ``--x`` (true), ``--no-x`` (false), ``--x VALUE`` / ``--x=VALUE``.

    Declared with its option strings, the negative ones starting with ``--no-``; ``optional=True``
    also accepts ``none`` (the option unset). The next word is taken as the value only when it is a
    boolean: :class:`Parser` joins ``--x VALUE`` into ``--x=VALUE`` before argparse sees it, so the
    word after a bare flag is never swallowed.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = False, optional: bool = False,
                 help: Optional[str] = None, required: bool = False) -> None:
        self.negatives = frozenset(s for s in option_strings if s.startswith("--no-"))
        self.optional = optional
        super().__init__(option_strings, dest, nargs="?", const=None, default=default, metavar="BOOL",
                         help=help, required=required)

    def literals(self) -> tuple[str, ...]:
        """The words this flag takes as its value."""
        return TRUE + FALSE + (UNSET if self.optional else ())

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        if option_string in self.negatives:
            if values is not None:
                raise argparse.ArgumentError(self, f"{option_string} takes no value, got {values!r}")
            value: Optional[bool] = False
        elif values is None:
            value = True
        else:
            try:
                value = parse_bool(values, self.optional)
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, value)


def add_bool(parser: argparse.ArgumentParser, *flags: str, default: Any = False, help: str,
             optional: bool = False, dest: Optional[str] = None) -> argparse.Action:
    """Add a boolean option (``flags``: e.g. ``"-v", "--verbose"``); its ``--no-`` form is added here.

    ``default`` may be ``argparse.SUPPRESS`` (the attribute is set only when the flag is given).
    """
    long = [f for f in flags if f.startswith("--")]
    if not long:
        raise ValueError(f"a boolean option needs a --long form, got {flags}")
    negative = "--no-" + long[-1][2:]
    kwargs: dict[str, Any] = {"dest": dest} if dest else {}
    return parser.add_argument(*flags, negative, action=BoolFlag, default=default, optional=optional,
                               help=help, **kwargs)


# ---------------------------------------------------------------------------------------- help layout


class Formatter(argparse.HelpFormatter):
    """Shows a boolean flag as ``--x [BOOL], --no-x`` (its negative form takes no value)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            positive = [s for s in action.option_strings if s not in action.negatives]
            parts = positive[:-1] + [f"{positive[-1]} [BOOL]"] + sorted(action.negatives)
            return ", ".join(parts)
        return super()._format_action_invocation(action)


class RawFormatter(Formatter, argparse.RawDescriptionHelpFormatter):
    """:class:`Formatter` that keeps the description's line breaks (module docstrings with examples)."""


# ---------------------------------------------------------------------------------------- the parser


class Parser(argparse.ArgumentParser):
    """An argument parser with one-line errors, plain help, boolean flags and sub-commands built when used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        if kwargs.get("description"):
            kwargs["description"] = plain(kwargs["description"])
        super().__init__(*args, **kwargs)
        self._build: Optional[Callable[[argparse.ArgumentParser], None]] = None
        self._has_commands = False

    def error(self, message: str) -> "typing.NoReturn":
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")

    def describe(self, text: Optional[str], raw: bool = False) -> None:
        """Set the description (``--help``'s text above the options); ``raw`` keeps its line breaks."""
        self.description = plain(text)
        if raw:
            self.formatter_class = RawFormatter

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = plain(kwargs["help"])
        return super().add_argument(*args, **kwargs)

    def add_subparsers(self, **kwargs: Any) -> Any:
        self._has_commands = True
        kwargs.setdefault("action", Commands)
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)

    # ---- sub-commands built when used

    def defer(self, build: Callable[[argparse.ArgumentParser], None]) -> None:
        """Let ``build(self)`` add the options when this (sub-command) parser is first used."""
        self._build = build

    def complete(self) -> "Parser":
        """Add the deferred options now (once); returns the parser."""
        build, self._build = self._build, None
        if build is not None:
            build(self)
        return self

    def format_help(self) -> str:
        self.complete()
        return super().format_help()

    def print_help(self, file: Any = None) -> None:
        # argparse ignores a failed write; a closed pipe (`granet train --help | head`) is main()'s to handle
        (file or sys.stdout).write(self.format_help())

    def parse_known_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                         namespace: Optional[argparse.Namespace] = None) -> tuple[argparse.Namespace, list[str]]:
        self.complete()
        return super().parse_known_args(self._join_bool_values(list(sys.argv[1:] if args is None else args)),
                                        namespace)

    # ---- boolean flags

    def _bool_flag(self, token: str) -> tuple[Optional[BoolFlag], str]:
        """The boolean flag ``token`` names (exactly, or as an unambiguous ``--`` prefix), and its option string."""
        actions = self._option_string_actions
        if "=" in token or not token.startswith("-"):
            return None, token
        if token not in actions and self.allow_abbrev and token.startswith("--"):
            matches = [s for s in actions if s.startswith(token)]
            if len(matches) != 1:
                return None, token  # unknown or ambiguous: argparse says so
            token = matches[0]
        action = actions.get(token)
        return (action, token) if isinstance(action, BoolFlag) else (None, token)

    def _join_bool_values(self, args: list[str]) -> list[str]:
        """``--x VALUE`` → ``--x=VALUE`` (VALUE a boolean); bare ``--x`` → ``--x=true``, ``--no-x`` → ``--x=false``.

        Every boolean flag then carries its value, so argparse never takes the following word (a
        positional argument, or the sub-command) as one. In a parser without positional arguments
        any word after a flag is its value (a bad one is an error naming it). Stops at ``--`` and, in a parser with
        sub-commands, at the first positional word (the sub-command: its own parser does the rest).
        """
        # Without positional arguments, the word after a flag can only be meant as its value: take any,
        # so that `--overwrite maybe` is reported as a bad value of --overwrite.
        any_word = not self._has_commands and all(a.option_strings for a in self._actions)
        out: list[str] = []
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--" or (self._has_commands and not token.startswith("-")):
                out.extend(args[i:])
                break
            action, option = self._bool_flag(token)
            i += 1
            if action is None:
                out.append(token)
                continue
            positive = next(s for s in action.option_strings if s not in action.negatives and s.startswith("--"))
            value = args[i] if i < len(args) else None
            if value is not None and (value.strip().lower() in action.literals()
                                      or (any_word and not value.startswith("-"))):
                out.append(f"{option}={value}")  # a value after --no-x is refused by BoolFlag, naming it
                i += 1
            else:
                out.append(f"{positive}={'false' if option in action.negatives else 'true'}")
        return out


class Commands(argparse._SubParsersAction):
    """Sub-commands whose options are added when the sub-command is parsed (see :meth:`Parser.defer`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        chosen = self.choices.get(values[0]) if values else None
        if isinstance(chosen, Parser):
            chosen.complete()
        super().__call__(parser, namespace, values, option_string)


def add_command(sub: Any, name: str, build: Callable[[argparse.ArgumentParser], None], **kwargs: Any) -> None:
    """Register sub-command ``name`` on ``sub`` (``add_subparsers()``'s result); ``build(parser)`` adds its options.

    On a :class:`Parser` the options are added when the sub-command is used; on any other parser, now.
    """
    parser = sub.add_parser(name, **kwargs)
    if isinstance(parser, Parser):
        parser.defer(build)
    else:
        build(parser)


def describe(parser: argparse.ArgumentParser, text: Optional[str], raw: bool = False) -> None:
    """Set ``parser``'s description (plain text on a :class:`Parser`); ``raw`` keeps its line breaks."""
    if isinstance(parser, Parser):
        parser.describe(text, raw)
        return
    parser.description = text
    if raw:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every sub-command's parser of ``parser``, with its options added."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if isinstance(sub, Parser):
                    sub.complete()
                found[name] = sub
    return found


__all__ = ["Parser", "BoolFlag", "add_bool", "add_command", "command_parsers", "describe", "one_line", "parse_bool",
           "plain"]
