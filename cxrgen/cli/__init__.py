"""The cxrgen command line: each command collects options, builds one options object and calls one library function.

Every command is registered below, in the order `cxrgen --help` lists them; its code is in the module named
beside it. This package is the only importer of Typer and never imports torch at import time.
"""
from __future__ import annotations

import re
from typing import Annotated

import typer
from typer.core import TyperCommand

from cxrgen import __version__
from cxrgen.cli import cache, manifest, results, run

app = typer.Typer(
    help="Turn a table of radiology-report sentences into a labelled synthetic chest X-ray dataset "
         "(research use only, not for clinical use).\n\n"
         "Example: cxrgen generate manifests/demo.csv --out demo_out, then cxrgen status demo_out",
    # Plain click help: rich's tables label every flag <bool>, as if it took a value, and eat [defaults]
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)

# (command name, function): the whole command line in one list.
COMMANDS = [
    ("generate", run.generate),
    ("resume", run.resume),
    ("status", run.status),
    ("evaluate", results.evaluate),
    ("reproduce", results.reproduce),
    ("export", results.export),
    ("preview", results.preview),
    ("manifest from-labels", manifest.manifest_from_labels),
    ("manifest from-reports", manifest.manifest_from_reports),
    ("plan", run.plan),
    ("download", cache.download),
    ("info", cache.info),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cxrgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """cxrgen: synthetic chest X-rays from report sentences, reproducible and resumable."""




class _Command(TyperCommand):
    """Usage lines as manual pages write them: required arguments bare (MANIFEST), optional ones in [ ]."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        # Typer writes a required argument as {MANIFEST}, which reads like a literal brace or a choice
        return [re.sub(r"^\{(.*)\}(\.\.\.)?$", r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]


for _name, _function in COMMANDS:
    if _name.startswith("manifest "):
        manifest.manifest_app.command(_name.split(" ", 1)[1], cls=_Command)(_function)
    else:
        app.command(_name, cls=_Command)(_function)
    if _name == "preview":  # `cxrgen --help` has always listed the manifest group here
        app.add_typer(manifest.manifest_app, name="manifest")


def _usage_line(exc, args: list[str]) -> str:
    """One line for a command-line mistake: what is wrong, the fix where one is known, where help is."""
    import difflib

    from typer._click import exceptions as click_exc  # typer vendors click

    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx else " ".join(["cxrgen", *args[:1]]) if args and args[0].isalpha() else "cxrgen"
    param = getattr(exc, "param", None)
    cause = getattr(exc.__cause__, "errors", None)
    if isinstance(exc, click_exc.NoSuchOption):
        best = difflib.get_close_matches(exc.option_name, exc.possibilities or [], n=1)
        text = f"no such option {exc.option_name}" + (f"; did you mean {best[0]}?" if best else "")
    elif isinstance(exc, click_exc.MissingParameter) and param is not None:
        text = f"missing {param.param_type_name} {(param.name or '').upper()}"
    elif isinstance(exc, click_exc.BadParameter) and param is not None and callable(cause):
        error = cause()[0]
        kind = {"int_parsing": "a valid integer", "float_parsing": "a valid number"}.get(error.get("type"))
        name = param.opts[0] if param.opts else param.name
        example = f"; e.g. {name} {param.default}" if kind and param.default is not None else ""
        text = (f"{name}: {error.get('input')!r} is not {kind}{example}" if kind
                else f"{name}: {exc.format_message()}")
    else:
        text = exc.format_message()
    return f"{' '.join(text.split())}  (see '{where} --help')"


def main() -> None:
    """Console-script entry point: a usage mistake is one line (exit 2); the rest as Typer does it."""
    import sys

    from typer._click import exceptions as click_exc  # typer vendors click

    try:
        code = app(prog_name="cxrgen", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:  # a bare `cxrgen` or `cxrgen manifest`: the help page
        exc.show()
        sys.exit(exc.exit_code)
    except click_exc.UsageError as exc:
        typer.echo(f"cxrgen: error: {_usage_line(exc, sys.argv[1:])}", err=True)
        sys.exit(exc.exit_code)
    except click_exc.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:  # typer raises its own Abort (its vendored click has none)
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
