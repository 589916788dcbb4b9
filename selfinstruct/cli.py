"""The command line: resolves config once, runs a command, turns user errors into exit codes."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from selfinstruct import __version__
from selfinstruct.errors import UserError

app = typer.Typer(
    name="selfinstruct",
    help="Turn seed tasks into clean, diverse instruction-tuning data with any OpenAI-compatible teacher.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Set by --debug: show the traceback instead of the one-line message.
_debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"selfinstruct {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """selfinstruct: seeds → teacher → parsed, filtered, deduplicated records."""
    global _debug
    _debug = debug


def fail(exc: UserError) -> None:
    """Print a user error on one line (stderr) and exit with its code."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


def main() -> None:
    """Console-script entry point."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        if _debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        if _debug:
            raise
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (hint: re-run with --debug and report it)", err=True)
        sys.exit(1)
