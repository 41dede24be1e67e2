"""Write docs/cli.md from every command's `--help`, so the reference never drifts from the code.

    python docs/make_cli_md.py           # rewrite docs/cli.md
    python docs/make_cli_md.py --check   # exit 1 (and say so) when docs/cli.md differs from what it would write

It walks the Typer app (`cxrgen.cli.app`) as click sees it, recursing into groups such as `manifest`, and renders
each command's help at a fixed width of 100 columns, so the page does not depend on the terminal it is made in.
tests/test_docs.py runs the same check.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
WIDTH = 100

HEADER = """# Command-line reference

Every command's `--help` text, rendered at a fixed width of 100 columns so that this page does not depend on
the terminal it is made in (`cxrgen COMMAND --help` wraps the same text to your terminal, at most 80 columns).
This page is generated from the code by `python docs/make_cli_md.py`; do not edit it by hand.
`python docs/make_cli_md.py --check` exits 1 when it is stale, and `tests/test_docs.py` runs that check.
Where each command's code is: the README's [Where the code is](../README.md#where-the-code-is).
"""


def help_pages() -> list[tuple[str, str, str]]:
    """(command path, help text, one-line summary) of the app and of every command and group below it, in `--help` order."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the checkout's cxrgen, also without `pip install -e .`
    import typer

    from cxrgen.cli import app

    root = typer.main.get_command(app)
    pages: list[tuple[str, str, str]] = []

    def walk(command, name: str, parent) -> None:
        ctx = command.context_class(command, info_name=name, parent=parent,
                                    terminal_width=WIDTH, max_content_width=WIDTH)
        pages.append((ctx.command_path, command.get_help(ctx), command.get_short_help_str(limit=300)))
        if hasattr(command, "list_commands"):  # a group: its subcommands, in the order its help lists them
            for sub_name in command.list_commands(ctx):
                walk(command.get_command(ctx, sub_name), sub_name, ctx)

    walk(root, "cxrgen", None)
    return pages


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (lowercase, punctuation but - and _ dropped, spaces to -)."""
    kept = "".join(c for c in heading.lower() if c.isalnum() or c in "-_ ")
    return kept.replace(" ", "-")


def render() -> str:
    pages = help_pages()
    lines = [HEADER]
    lines.append("".join(f"- [`{path}`](#{slug(path)}): {summary}\n" for path, _, summary in pages[1:]))
    for path, text, _ in pages:
        lines.append(f"## {path}\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print("usage: python docs/make_cli_md.py [--check]", file=sys.stderr)
        return 2
    text = render()
    if argv == ["--check"]:
        current = CLI_MD.read_text(encoding="utf-8") if CLI_MD.is_file() else ""
        if current != text:
            print(f"{CLI_MD.relative_to(ROOT)} is stale: run `python docs/make_cli_md.py`", file=sys.stderr)
            return 1
        print(f"{CLI_MD.relative_to(ROOT)} is up to date")
        return 0
    CLI_MD.write_text(text, encoding="utf-8")
    print(f"wrote {CLI_MD.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
