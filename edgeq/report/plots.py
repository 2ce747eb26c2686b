"""Pareto plots as inline SVG text (matplotlib, Agg backend): quality against latency, size, energy.

Only measured points are drawn; an axis with no measured point says so instead of being empty.
The SVG is self-contained (glyphs as paths, no fonts, images or links to fetch).
"""

from __future__ import annotations

import io
import re
from typing import Any

_AXES = (("latency", "p50 latency (ms)"), ("size", "file size (bytes)"), ("energy", "energy / inference (mJ)"))


def _cost(c: dict, axis: str):
    if axis == "latency":
        return c["latency_ms"]["p50"]
    if axis == "size":
        return c["size"]["bytes"]
    return c["energy"]["per_inference_mj"]


def pareto_svg(model: dict[str, Any]) -> str:
    """One figure of three panels for one model of the report document; returns <svg>...</svg>."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = model["columns"]
    pareto = model["pareto"]
    excluded = set(pareto["excluded"])
    q = next((c["quality"] for c in cols if c["quality"]), None)
    with matplotlib.rc_context({"svg.hashsalt": "edgeq", "svg.fonttype": "path", "font.size": 8}):
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
        groups = sorted({c["group"] for c in cols})
        colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
        for ax, (axis, label) in zip(axes, _AXES):
            ax.set_xlabel(label)
            if q:
                ax.set_ylabel(f"{q['metric']} ({'higher' if q['higher_is_better'] else 'lower'} is better)")
            pts = [c for c in cols if c["id"] not in excluded and _cost(c, axis) is not None]
            if axis == "size":  # one point per artifact
                pts = list({c["artifact_sha256"]: c for c in reversed(pts)}.values())
            if not pts:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            front = set(pareto["size"]) if axis == "size" else {i for ids in pareto[axis].values() for i in ids}
            by_group: dict[str, list] = {}
            for c in pts:
                key = "all boards" if axis == "size" else c["group"]
                by_group.setdefault(key, []).append(c)
            for g, members in by_group.items():
                color = colors.get(g, "black")
                on = sorted((c for c in members if (c["artifact_sha256"] if axis == "size" else c["id"]) in front),
                            key=lambda c: _cost(c, axis))
                off = [c for c in members if c not in on]
                if on:
                    ax.plot([_cost(c, axis) for c in on], [c["quality"]["value"] for c in on], "-o", color=color,
                            label=g if axis != "size" else "Pareto front")
                if off:
                    ax.plot([_cost(c, axis) for c in off], [c["quality"]["value"] for c in off], "o",
                            mfc="none", color=color)
                for c in members:
                    ax.annotate(c["label"], (_cost(c, axis), c["quality"]["value"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            ax.set_title(f"quality vs {axis}")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=2, frameon=False)
            fig.subplots_adjust(bottom=0.32, wspace=0.3)
        else:
            fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE (an external DTD reference)


def no_fetches(svg: str) -> bool:
    """True if the SVG references nothing outside itself (namespace declarations aside)."""
    body = re.sub(r'xmlns(:\w+)?="[^"]*"', "", svg)
    return not re.search(r'(href|src)="(?!#)|url\((?!#)|@import', body)
