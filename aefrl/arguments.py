"""Command-line parsing shared by the scripts, importing nothing heavy: ``--help`` and a
mistyped option answer at once, before torch, torchrl and dm_control load (~4 s)."""

from __future__ import annotations

import argparse
import math

from aefrl import __version__

#: What ``--version`` prints in every script (train.py's would be Hydra's own otherwise).
VERSION = f"aefrl {__version__}"


class Parser(argparse.ArgumentParser):
    """argparse with a mistake on the command line as one line, ``error: <what was wrong>``, and
    exit code 2, as the scripts print every bad input: argparse's usage block above it buried the
    sentence (``--help`` shows the usage); ``--version`` prints :data:`VERSION`; every option's
    default in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=VERSION)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        """As argparse's, with ``(default: ...)`` appended to an option's help unless it names
        its default itself or has none to show (None, a flag's False)."""
        return _show_default(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args, **kwargs):
        """As argparse's; its options' help names their defaults too."""
        group = super().add_argument_group(*args, **kwargs)
        plain = group.add_argument
        group.add_argument = lambda *a, **k: _show_default(plain(*a, **k))
        return group

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _show_default(action: argparse.Action) -> argparse.Action:
    """``action`` with ``(default: ...)`` appended to its help (see :meth:`Parser.add_argument`)."""
    default, text = action.default, action.help or ""
    shown = default is None or default is False or default is argparse.SUPPRESS
    named = text is argparse.SUPPRESS or "(default" in text
    if action.option_strings and not shown and not named:
        action.help = f"{text} (default: %(default)s)".lstrip()
    return action


def _number(text: str, cast, valid, expected: str):
    """``cast(text)`` if it parses and is ``valid``; else argparse's one-line error."""
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def seed_arg(text: str) -> int:
    """argparse type of a seed: an integer in [0, 2**32 - 1] (numpy's and dm_control's range)."""
    return _number(text, int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32 - 1]")


def positive_int(text: str) -> int:
    """argparse type of a count or a size: a whole number >= 1."""
    return _number(text, int, lambda v: v >= 1, "a whole number >= 1")


def positive_float(text: str) -> float:
    """argparse type of a rate or a scale: a finite number > 0."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def gif_path(text: str) -> str:
    """argparse type of a ``--video`` path: a ``.gif`` file (the scripts write GIFs, whatever
    the name says), or ``''`` for none."""
    if text and not text.lower().endswith(".gif"):
        raise argparse.ArgumentTypeError(
            f"expected a path ending in .gif (or '' for none), got {text!r}"
        )
    return text


def add_episode_options(parser: argparse.ArgumentParser, seed: int, what: str) -> None:
    """``--seed`` (of the ``what`` episodes and of torch, default ``seed``) and ``--render``:
    the options every script that plays DMC episodes from a checkpoint shares."""
    parser.add_argument(
        "--seed",
        type=seed_arg,
        default=seed,
        help=f"seed of the {what} episodes and of torch (default: %(default)s)",
    )
    parser.add_argument(
        "--render",
        default=None,
        choices=["faithful", "fast"],
        help="faithful (dm_control's pixels, for results) or fast (no shadows or "
        "multisampling) (default: the run's own env.render, so the agent sees the pixels it "
        "trained on)",
    )
