"""`edgeq check ARTIFACT|QDIR --target NAME [--runtime R] [--json]`: will it run natively?

Exit 0 when every op runs natively, 1 when something falls back or is unsupported, 2 on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("check")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", "target", required=True, help="Board profile name (see `edgeq targets list`) or a .toml file.")
@click.option("--runtime", default=None, help="Runtime of the profile (default: the profile's default for the format).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def check(ctx: click.Context, artifact: Path, target: str, runtime: str | None, as_json: bool) -> int:
    """Check an exported .onnx/.tflite file or a quantized-model directory against a target.

    Every op is reported with its dtypes and bits as native, fallback (to what, why) or
    unsupported. A quantized-model directory without --runtime is checked for every runtime of the
    board and passes when one of them runs every op natively. Exit 0: all native; 1: something
    falls back or is unsupported; 2: bad input.
    """
    from ..targets import check as run_check
    from ..targets import load_profile
    from ..targets.check import detect_format

    prof = load_profile(target)
    if detect_format(artifact) == "qdir" and runtime is None:
        # A plan has no format yet: check it for every runtime of the board.
        reports = [run_check(artifact, prof, rt.name) for rt in prof.runtimes.values()]
    else:
        reports = [run_check(artifact, prof, runtime)]
    if as_json:
        out = [r.to_dict() for r in reports]
        click.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        click.echo("\n\n".join(r.render() for r in reports))
    code = min(r.exit_code for r in reports)
    if code:
        ctx.exit(code)
    return 0
