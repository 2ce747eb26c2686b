"""TargetProfile: one board described as data, loaded from a TOML file and validated.

Search path, first hit wins: every directory in `EDGEQ_PROFILES` (os.pathsep-separated), then the
user's config directory (`platformdirs.user_config_dir("edgeq")/profiles`), then the profiles
bundled in the package (`edgeq/profiles/*.toml`, shipped in the wheel). A user adds a board by
dropping `NAME.toml` into one of those directories.

A profile answers two questions: how does runtime R on this board run one op use (`classify`),
and which weight bit-widths / group sizes / activation modes run natively (`weight_options`,
`supported_weight_bits`), which mixed precision uses to choose bits per layer.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..errors import EdgeqError
from .schema import validate
from .uses import CANDIDATE_GROUP_SIZES, OpUse, op_act

ENV_VAR = "EDGEQ_PROFILES"


@dataclass(frozen=True)
class Rule:
    """One line of a runtime's op table; the first rule that matches an op use decides."""

    op: tuple[str, ...]
    support: str
    source: tuple[str, ...]
    act: tuple[str, ...] | None = None
    weight: tuple[str, ...] | None = None
    granularity: tuple[str, ...] | None = None
    group_sizes: tuple[int, ...] | None = None
    kernel: str = ""
    fallback_to: str = ""
    why: str = ""
    note: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        tup = lambda k: tuple(d[k]) if k in d else None  # noqa: E731
        return cls(op=tuple(d["op"]), support=d["support"], source=tuple(d["source"]), act=tup("act"),
                   weight=tup("weight"), granularity=tup("granularity"), group_sizes=tup("group_sizes"),
                   kernel=d.get("kernel", ""), fallback_to=d.get("fallback_to", ""), why=d.get("why", ""),
                   note=d.get("note", ""))

    def matches(self, use: OpUse) -> bool:
        if "*" not in self.op and use.op not in self.op:
            return False
        if self.act is not None and use.act not in self.act:
            return False
        if self.weight is not None and use.weight not in self.weight:
            return False
        if self.granularity is not None and use.granularity not in self.granularity:
            return False
        if self.group_sizes is not None and use.granularity == "group" and use.group_size not in self.group_sizes:
            return False
        return True


@dataclass(frozen=True)
class Verdict:
    """How a runtime runs one op use: native / fallback (to what, why) / unsupported."""

    support: str
    kernel: str = ""
    fallback_to: str = ""
    why: str = ""
    source: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"support": self.support, "kernel": self.kernel, "fallback_to": self.fallback_to,
                "why": self.why, "source": list(self.source)}


@dataclass(frozen=True)
class Runtime:
    name: str
    package: str
    version: str
    format: str
    provider: str
    rules: tuple[Rule, ...]
    source: tuple[str, ...]
    default: bool = False
    install: str = ""
    note: str = ""

    def classify(self, use: OpUse) -> Verdict:
        for rule in self.rules:
            if rule.matches(use):
                return Verdict(rule.support, rule.kernel, rule.fallback_to, rule.why, rule.source)
        return Verdict("unsupported", why=f"the profile does not describe {use.op} [{use.signature}] for "
                                          f"{self.name} (no rule matches; treated as unsupported)")


@dataclass(frozen=True)
class WeightOption:
    """A weight format that runs natively for a layer kind: bits, dtype, granularity, group, activations."""

    bits: int
    dtype: str
    act: str
    granularity: str
    group_size: int | None = None
    op: str = ""

    def to_dict(self) -> dict:
        return {"bits": self.bits, "dtype": self.dtype, "act": self.act, "granularity": self.granularity,
                "group_size": self.group_size, "op": self.op}


# Layer kinds (as in quant.json) -> the ops a format can render them as; the first is the default
# rendering (what an exporter writes unless told otherwise).
KIND_OPS = {
    "onnx": {"linear": ("MatMul", "MatMulNBits"), "conv": ("Conv",), "embedding": ("Gather", "GatherBlockQuantized")},
    "tflite": {"linear": ("FULLY_CONNECTED",), "conv": ("CONV_2D",), "embedding": ("GATHER",)},
}


@dataclass(frozen=True)
class TargetProfile:
    name: str
    title: str
    path: str
    data: dict = field(repr=False, compare=False)
    runtimes: dict[str, Runtime] = field(repr=False, compare=False)

    @property
    def formats(self) -> list[str]:
        return sorted({rt.format for rt in self.runtimes.values()})

    def runtime(self, name: str | None = None, fmt: str | None = None) -> Runtime:
        """A runtime by name, or the default one for `fmt` (the first `default = true`, else the first)."""
        if name is not None:
            if name not in self.runtimes:
                raise EdgeqError(f"--runtime: {name!r} is not a runtime of {self.name} "
                                 f"(allowed: {', '.join(self.runtimes)})")
            rt = self.runtimes[name]
            if fmt is not None and rt.format != fmt:
                raise EdgeqError(f"--runtime: {name} runs {rt.format} files, not {fmt}")
            return rt
        candidates = [rt for rt in self.runtimes.values() if fmt is None or rt.format == fmt]
        if not candidates:
            raise EdgeqError(f"target {self.name}: no runtime for {fmt} files (formats: {', '.join(self.formats)})")
        return next((rt for rt in candidates if rt.default), candidates[0])

    def runtimes_for(self, fmt: str | None = None) -> list[Runtime]:
        return [rt for rt in self.runtimes.values() if fmt is None or rt.format == fmt]

    def classify(self, use: OpUse, runtime: str | None = None, fmt: str | None = None) -> Verdict:
        return self.runtime(runtime, fmt).classify(use)

    def weight_options(self, runtime: str | None = None, fmt: str | None = None, kind: str = "linear",
                       acts: Iterable[str] | None = None, support: Iterable[str] = ("native",)) -> list[WeightOption]:
        """Every (bits, dtype, granularity, group, activation) a `kind` layer can use on `runtime`.

        Mixed precision asks this for the bit-widths it may choose from; `support` widens the answer
        to fallbacks when the user allows them. `acts` takes op-level modes (fp32, dynamic, int8,
        uint8) or a recipe's activation modes (none, dynamic, static), which are translated to what
        edgeq's exporter writes for the runtime's format (weight-only TFLite is dynamic-range).
        """
        rt = self.runtime(runtime, fmt)
        ops = KIND_OPS[rt.format].get(kind)
        if ops is None:
            raise EdgeqError(f"kind: {kind!r} is not one of: {', '.join(KIND_OPS[rt.format])}")
        # Recipe modes (none / dynamic / static) are translated to what the export writes for this format.
        acts = tuple(dict.fromkeys(op_act(a, rt.format) for a in acts)) if acts is not None else (
            "fp32", "dynamic", "int8", "uint8")
        wanted = set(support)
        out = []
        for act in acts:
            for dtype in ("int2", "uint2", "int4", "uint4", "int8", "uint8"):
                for gran in ("tensor", "channel", "group"):
                    for gs in (CANDIDATE_GROUP_SIZES if gran == "group" else (None,)):
                        for op in ops:
                            use = OpUse(op=op, act=act, weight=dtype, granularity=gran, group_size=gs)
                            if rt.classify(use).support in wanted:
                                out.append(WeightOption(use.weight_bits, dtype, act, gran, gs, op))
                                break
        return out

    def supported_weight_bits(self, runtime: str | None = None, fmt: str | None = None, kind: str = "linear",
                              acts: Iterable[str] | None = None, allow_fallback: bool = False) -> list[int]:
        """The sorted weight bit-widths that run natively (or also via fallback) for a `kind` layer."""
        support = ("native", "fallback") if allow_fallback else ("native",)
        return sorted({o.bits for o in self.weight_options(runtime, fmt, kind, acts, support)})

    def summary(self) -> dict:
        """The profile as plain data (what `edgeq targets show --json` prints)."""
        return {"name": self.name, "title": self.title, "path": self.path, "formats": self.formats, **{
            k: v for k, v in self.data.items() if k not in ("name", "title")}}


def search_dirs() -> list[Path]:
    """Profile directories in search order (see the module docstring)."""
    dirs = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    try:
        import platformdirs

        dirs.append(Path(platformdirs.user_config_dir("edgeq")) / "profiles")
    except ImportError:  # platformdirs is a base dependency; tolerate a broken env for listing
        pass
    dirs.append(Path(str(resources.files("edgeq") / "profiles")))
    return dirs


def _candidates() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in search_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def profile_names() -> list[str]:
    return sorted(_candidates())


def load_profile_file(path: str | os.PathLike) -> TargetProfile:
    """Load and validate one profile file; errors name the file and the key path."""
    path = Path(path)
    try:
        data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EdgeqError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgeqError(f"{path}: not valid TOML: {exc}") from None
    data = validate(data, str(path))
    if data["name"] != path.stem:
        raise EdgeqError(f"{path}: name: {data['name']!r} must equal the file name {path.stem!r}")
    runtimes = {}
    for rname, rt in data["runtimes"].items():
        runtimes[rname] = Runtime(
            name=rname, package=rt["package"], version=rt["version"], format=rt["format"],
            provider=rt["provider"], rules=tuple(Rule.from_dict(r) for r in rt["ops"]),
            source=tuple(rt["source"]), default=rt.get("default", False), install=rt.get("install", ""),
            note=rt.get("note", ""))
    return TargetProfile(name=data["name"], title=data["title"], path=str(path), data=data, runtimes=runtimes)


def load_profile(ref: str | os.PathLike | TargetProfile) -> TargetProfile:
    """A profile by name (searched as described above), by alias, or from a `.toml` path."""
    if isinstance(ref, TargetProfile):
        return ref
    text = str(ref)
    if text.endswith(".toml") or os.sep in text:
        return load_profile_file(text)
    found = _candidates()
    if text in found:
        return load_profile_file(found[text])
    for name, path in found.items():
        prof = load_profile_file(path)
        if text in prof.data.get("aliases", []):
            return prof
    raise EdgeqError(f"--target: {text!r} is not a known target (known: {', '.join(sorted(found))}; "
                     f"add one as NAME.toml in ${ENV_VAR} or {search_dirs()[-2] if len(search_dirs()) > 1 else ''})")


def list_profiles() -> list[TargetProfile]:
    """Every profile on the search path, validated (a broken file is an error, not skipped)."""
    return [load_profile_file(p) for _, p in sorted(_candidates().items())]
