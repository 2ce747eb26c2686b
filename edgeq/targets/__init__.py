"""Board profiles (`edgeq/profiles/*.toml`, user dirs) and checking artifacts and plans against them.

    from edgeq.targets import load_profile, check, gate_export
    report = check("model.onnx", "rpi5")            # CheckReport: rows of native / fallback / unsupported
    meta = gate_export("qdir", "rpi4", fmt="onnx")  # raises EdgeqError naming the nearest working recipe
    load_profile("rpi5").supported_weight_bits("onnxruntime-cpu")   # bits mixed precision may use

This package never imports torch; the ONNX and TFLite readers import `onnx` / the LiteRT schema
only when such a file is checked.
"""

from .check import CheckReport, GateResult, Row, check, gate_export, nearest
from .profile import (Runtime, TargetProfile, Verdict, WeightOption, list_profiles, load_profile,
                      load_profile_file, profile_names, search_dirs)
from .uses import OpUse, recipe_name

__all__ = [
    "CheckReport", "GateResult", "OpUse", "Row", "Runtime", "TargetProfile", "Verdict", "WeightOption",
    "check", "gate_export", "list_profiles", "load_profile", "load_profile_file", "nearest",
    "profile_names", "recipe_name", "search_dirs",
]
