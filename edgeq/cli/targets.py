"""`edgeq targets list|show NAME [--json]`: the board profiles on the search path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click


@click.group("targets")
def targets() -> None:
    """Board profiles: CPU features, memory, runtimes and what they run natively."""


@targets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(as_json: bool) -> None:
    """List every profile on the search path (EDGEQ_PROFILES, user config, bundled)."""
    from ..targets import list_profiles, search_dirs
    from ..targets.profile import ENV_VAR

    for d in os.environ.get(ENV_VAR, "").split(os.pathsep):  # a typo there hides the profiles it was to add
        if d and not Path(d).is_dir():
            click.echo(f"edgeq: note: ${ENV_VAR} names {d}, which is not a directory: no profiles read from it",
                       err=True)
    profiles = list_profiles()
    if as_json:
        click.echo(json.dumps([{"name": p.name, "title": p.title, "formats": p.formats,
                                "runtimes": list(p.runtimes), "path": p.path} for p in profiles], indent=2))
        return
    width = max((len(p.name) for p in profiles), default=4)
    for p in profiles:
        click.echo(f"{p.name:<{width}}  {p.title}  [{', '.join(p.runtimes)}]")
    click.echo(f"(search path: {', '.join(str(d) for d in search_dirs())})")


@targets.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the whole profile as JSON.")
def show(name: str, as_json: bool) -> None:
    """Show one profile: hardware, OS, power sensor, runtimes and natively supported weight formats."""
    from ..targets import load_profile

    prof = load_profile(name)
    if as_json:
        click.echo(json.dumps(prof.summary(), indent=2))
        return
    d = prof.data
    cpu = d["cpu"]
    click.echo(f"{prof.name}: {prof.title}\n  file: {prof.path}")
    click.echo(f"  cpu: {cpu['cores']}x {cpu['model']} ({cpu['arch']}); features: {', '.join(cpu['features'])}")
    if cpu.get("lacks"):
        click.echo(f"       lacks: {', '.join(cpu['lacks'])}")
    if cpu.get("optional"):
        click.echo(f"       optional (dispatched at run time): {', '.join(cpu['optional'])}")
    if "gpu" in d:
        g = d["gpu"]
        click.echo(f"  gpu: {g['model']} ({g['arch']}); int8: {g['int8']}, fp16: {g['fp16']}")
    click.echo(f"  memory: {', '.join(f'{x:g}' for x in d['memory']['ram_gib'])} GiB")
    click.echo(f"  os: {d['os']['name']}")
    p = d["power"]
    rail = f", input rail {p['input_rail']}" if p.get("input_rail") else ""
    click.echo(f"  power sensor: {p['sensor']}{rail}")
    for rt in prof.runtimes.values():
        click.echo(f"  runtime {rt.name}{f' (default for {rt.format})' if rt.default else ''}: {rt.package} {rt.version}, "
                   f"{rt.format}, {rt.provider}; {len(rt.rules)} op rules")
        for kind in ("linear",):
            native = prof.weight_options(rt.name, kind=kind)
            by_act: dict[str, list] = {}
            for o in sorted(native, key=lambda o: (o.bits, o.granularity, o.group_size or 0)):
                form = f"w{o.bits}" + (f"/g{o.group_size}" if o.group_size else f"/{o.granularity}")
                if form not in by_act.setdefault(o.act, []):
                    by_act[o.act].append(form)
            for act, forms in sorted(by_act.items()):
                click.echo(f"    native {kind} weights with act={act}: {', '.join(forms)}")
