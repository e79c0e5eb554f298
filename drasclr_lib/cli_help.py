"""How every ``drasclr`` command's ``--help`` reads: each option's default shown, examples in the epilog.

Every sub-command builds its parser with :func:`command_parser` (or passes :class:`HelpFormatter`
as ``formatter_class``), so the help of all commands looks the same to a new user:

- an option that takes a value shows ``(default: VALUE)`` after its help text; a list or tuple
  default is shown as typed on the command line (``0.8 0.8 2.5``); an option without a default
  value (``None``) states in its own help what happens when it is left out, e.g.
  ``(default: all subjects)``, and a required one says ``(required)``;
- a switch (``--no-progress``, ``--overwrite``) shows no default: leaving it out is the default;
- the epilog (``examples:``) keeps its line breaks, one real command line per example.

Only the standard library is used, so a command's ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Iterable, Sequence

__all__ = ["HelpFormatter", "command_parser", "examples_epilog", "default_text", "auto_or_positive_int"]


def auto_or_positive_int(value: str) -> int | None:
    """An argparse ``type`` for options that take ``auto`` or a count: ``None`` for ``"auto"``, else the integer.

    Raises:
        argparse.ArgumentTypeError: for anything but ``auto`` or an integer of at least 1.
    """
    if str(value) == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {value!r}")
    return n


def default_text(value) -> str:
    """A default as a user would type it: ``0.8 0.8 2.5`` for a sequence, ``str(value)`` otherwise."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Argparse formatter: ``(default: ...)`` after every value option, description and epilog as written.

    The default is appended unless the help text already names one (``(default`` or
    ``%(default)``), the option is a switch (takes no value), its default is ``None``, empty or
    suppressed (the help says in words what happens then), or it is a required positional. A
    required option gets ``(required)`` instead.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text:
            return text
        if action.required and action.option_strings:
            return f"{text} (required)".strip()
        if action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        shown = default_text(action.default).replace("%", "%%")
        return f"{text} (default: {shown})".strip()


def examples_epilog(examples: Iterable[tuple[str, str]], note: str = "") -> str:
    """The ``examples:`` epilog: ``(comment, command line)`` pairs, then an optional closing note.

    Args:
        examples: what the example does (one line) and the command line itself.
        note: a paragraph after the examples (e.g. where to read more).

    Returns:
        The epilog text, line breaks kept by :class:`HelpFormatter`.
    """
    lines = ["examples:"]
    for comment, command in examples:
        lines += [f"  # {comment}", f"  {command}"]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def command_parser(prog: str, description: str, examples: Sequence[tuple[str, str]] = (),
                   note: str = "") -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for one ``drasclr`` sub-command, with :class:`HelpFormatter`.

    Args:
        prog: the command as typed, e.g. ``"drasclr segment"``.
        description: what the command does (a few lines; shown as written).
        examples: ``(comment, command line)`` pairs for the epilog (see :func:`examples_epilog`).
        note: a paragraph after the examples.

    Returns:
        The parser; add the options with ``add_argument(..., help=...)``.
    """
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter,
                                   epilog=examples_epilog(examples, note) if examples or note else None)
