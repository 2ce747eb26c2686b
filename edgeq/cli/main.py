"""The `edgeq` command group.

Each command lives in its own module and is imported only when it runs, so `edgeq agent serve`
on a board never imports torch. User errors (`EdgeqError`) become one line on stderr and exit 2; an
operating-system error (a full disk, a path that cannot be written) one line and exit 1, with the traceback
only under EDGEQ_DEBUG=1.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from ..console import quiet_converters
from ..errors import EdgeqError

# command name -> (module under edgeq.cli, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quantize": ("quantize", "quantize", "Quantize a model with a recipe into a quantized-model directory."),
    "export": ("export", "export", "Export a quantized-model directory to ONNX or TFLite."),
    "eval": ("evaluate", "eval_cmd", "Evaluate a model, quantized directory or exported file."),
    "inspect": ("inspect", "inspect", "Show a quantized model's per-layer decisions."),
    "recipes": ("recipes", "recipes", "List the built-in recipes."),
    "qat": ("qat", "qat", "Quantization-aware training (LSQ, LR-QAT, PB-LLM) into a quantized-model directory."),
    "demo": ("demo", "demo", "Run the main job end-to-end on built-in defaults."),
    "targets": ("targets", "targets", "List and show board profiles (CPU, runtimes, native ops)."),
    "check": ("check", "check", "Check an exported file or quantized directory against a board profile."),
    "agent": ("agent", "agent", "Run the on-device agent (on a board; no torch needed)."),
    "profile": ("profile", "profile", "Profile exported files on boards (or --local) and store the results."),
    "results": ("results", "results", "List or show stored profiling results."),
    "report": ("report", "report", "Write an HTML / Markdown / JSON report of variants x boards from the results database."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"edgeq.cli.{module}"), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="edgeq")
def cli() -> None:
    """edgeq: quantize, export, check and profile networks for edge boards."""


def main(argv: list[str] | None = None) -> int:
    quiet_converters()
    try:
        rv = cli.main(args=argv, prog_name="edgeq", standalone_mode=False)
    except EdgeqError as exc:
        click.echo(f"edgeq: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, EOFError):  # click turns an EOFError from anywhere into Abort: not a Ctrl-D
            return _internal_error(exc.__cause__)
        click.echo("edgeq: aborted", err=True)
        return 130
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        return 2
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"edgeq: error: {where}{' '.join(exc.format_message().split())}{hint}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"edgeq: error: {' '.join(exc.format_message().split())}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("edgeq: interrupted", err=True)
        return 130
    except OSError as exc:
        if os.environ.get("EDGEQ_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"edgeq: error: {exc.strerror or exc}{where}", err=True)
        return 1
    return rv if isinstance(rv, int) else 0


def _internal_error(exc: BaseException) -> int:
    """An exception no check caught: one line and exit 1 (the traceback under EDGEQ_DEBUG=1)."""
    if os.environ.get("EDGEQ_DEBUG"):
        raise exc
    click.echo(f"edgeq: error: {type(exc).__name__}: {exc} (EDGEQ_DEBUG=1 shows the traceback)", err=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
