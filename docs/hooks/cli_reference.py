"""MkDocs hook: the command-line reference, generated from gradalign's argparse parser.

It also puts this checkout's src/ first on sys.path, so that the API pages (mkdocstrings
inspects the imported package) and the CLI page describe this checkout's code.

A page containing the line `<!-- cli-reference -->` gets it replaced by one section per
subcommand (its summary, description, usage and every option with its default and help), so
the page cannot drift from the commands. `render(parser)` is what the tests check.
"""
from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

MARKER = "<!-- cli-reference -->"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def on_config(config):  # MkDocs' hook, before any page: this checkout's gradalign, not an installed one
    if sys.path[:1] != [SRC]:
        sys.path.insert(0, SRC)
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs' hook
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(_parser()))


def _parser() -> argparse.ArgumentParser:
    on_config(None)
    from gradalign.cli import build_parser
    return build_parser()


def _text(s: str) -> str:
    """Help text as Markdown: `code spans` kept; elsewhere no HTML tags from `<out>`, no
    emphasis from `*`, no link syntax from `[quick]`."""
    parts = re.split(r"(`[^`]*`)", " ".join(s.split()))
    return "".join(part if part.startswith("`") else
                   re.sub(r"([*\\[\]])", r"\\\1", html.escape(part, quote=False)) for part in parts)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % dict(vars(action), prog="gradalign")
    return _text(text)


def _label(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    metavar = action.metavar or action.dest.upper()
    if action.choices:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    return f"`{names} {metavar}`"


def _default(action: argparse.Action) -> str:
    if action.required or not action.option_strings:
        return " (required)"
    if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS) or "default" in (action.help or ""):
        return ""
    return f" (default: `{action.default}`)"


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _command(name: str, parser: argparse.ArgumentParser, summary: str | None) -> list[str]:
    out = [f"## `gradalign {name}`", ""]
    if summary:
        out += [_text(summary[0].upper() + summary[1:]) + ".", ""]
    if parser.description:
        out += [_text(parser.description), ""]
    out += ["```text", _usage(parser), "```", ""]
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    if actions:
        out += [f"- {_label(a)}{_default(a)}: {_help(a)}" for a in actions] + [""]
    if parser.epilog and isinstance(parser.formatter_class, type) and \
            issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter):
        out += ["```text", parser.epilog.rstrip(), "```", ""]
    return out


def render(parser: argparse.ArgumentParser) -> str:
    """The reference in Markdown: global options, then one `## gradalign NAME` per subcommand."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {c.dest: c.help for c in sub._choices_actions}
    out = ["```text", _usage(parser), "```", "", _text(parser.description or ""), ""]
    out += [f"- {_label(a)}: {_help(a)}" for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]
    out += ["", _text(parser.epilog or ""), ""]
    for name, subparser in sub.choices.items():
        out += _command(name, subparser, summaries.get(name))
    return "\n".join(out)
