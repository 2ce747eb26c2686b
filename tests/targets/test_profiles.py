"""Profiles: every bundled one validates; bad files fail naming file, key path and problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeq.errors import EdgeqError
from edgeq.targets import list_profiles, load_profile, load_profile_file, profile_names

TEST_PROFILE = Path(__file__).parent / "profiles" / "testboard.toml"

BUNDLED = ["arm64-generic", "jetson-nano", "jetson-orin-nano", "rpi4", "rpi5", "x86-64"]


def test_every_bundled_profile_validates(monkeypatch):
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    names = profile_names()
    assert set(BUNDLED) <= set(names)
    for prof in list_profiles():
        assert prof.runtimes, prof.name
        for rt in prof.runtimes.values():
            assert rt.rules and all(r.source for r in rt.rules), (prof.name, rt.name)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_answers_mixed_precision(name, monkeypatch):
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    prof = load_profile(name)
    for rt in prof.runtimes.values():
        bits = prof.supported_weight_bits(rt.name, allow_fallback=True)
        assert all(b in (2, 4, 8) for b in bits)


def _write(tmp_path: Path, text: str, name: str = "testboard") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_unknown_key_is_an_error_naming_file_and_key(tmp_path):
    text = TEST_PROFILE.read_text().replace('cores = 2\n', 'cores = 2\ncolour = "red"\n')
    path = _write(tmp_path, text)
    with pytest.raises(EdgeqError) as exc:
        load_profile_file(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: cpu.colour: unknown key")


def test_unknown_key_in_an_op_rule(tmp_path):
    text = TEST_PROFILE.read_text().replace('kernel = "integer GEMM"', 'kernel = "integer GEMM"\nspeed = 3')
    with pytest.raises(EdgeqError, match=r"runtimes\.ort\.ops\[0\]\.speed: unknown key"):
        load_profile_file(_write(tmp_path, text))


def test_fact_without_source_is_an_error(tmp_path):
    text = TEST_PROFILE.read_text().replace('ram_gib = [1]\nsource = "tests/targets/profiles/testboard.toml"\n',
                                            'ram_gib = [1]\n')
    with pytest.raises(EdgeqError) as exc:
        load_profile_file(_write(tmp_path, text))
    assert "testboard.toml: memory.source: a fact without a source" in str(exc.value)


def test_rule_without_source_is_an_error(tmp_path):
    text = TEST_PROFILE.read_text().replace('  kernel = "integer GEMM"\n  source = "test"\n', '  kernel = "integer GEMM"\n')
    with pytest.raises(EdgeqError, match=r"ops\[0\]\.source: a fact without a source"):
        load_profile_file(_write(tmp_path, text))


def test_fallback_needs_target_and_reason(tmp_path):
    text = TEST_PROFILE.read_text().replace('  fallback_to = "dequantize then fp32 GEMM"\n', '')
    with pytest.raises(EdgeqError, match=r"fallback_to: required"):
        load_profile_file(_write(tmp_path, text))


def test_bad_values_and_names(tmp_path):
    with pytest.raises(EdgeqError, match=r"support: 'maybe' is not one of"):
        load_profile_file(_write(tmp_path, TEST_PROFILE.read_text().replace('support = "native"', 'support = "maybe"', 1)))
    with pytest.raises(EdgeqError, match=r"must equal the file name"):
        load_profile_file(_write(tmp_path, TEST_PROFILE.read_text(), name="other"))
    with pytest.raises(EdgeqError, match=r"not valid TOML"):
        load_profile_file(_write(tmp_path, "schema = = 1"))
    with pytest.raises(EdgeqError, match=r"not a known target"):
        load_profile("no-such-board")


def test_search_path_user_dir_first(tmp_path, monkeypatch):
    # A user file named like a bundled profile shadows it.
    text = TEST_PROFILE.read_text().replace('name = "testboard"', 'name = "rpi4"')
    _write(tmp_path, text, name="rpi4")
    monkeypatch.setenv("EDGEQ_PROFILES", str(tmp_path))
    assert load_profile("rpi4").title == "Test board (invented facts)"
    monkeypatch.delenv("EDGEQ_PROFILES")
    assert "Raspberry Pi 4" in load_profile("rpi4").title


def test_weight_options_for_mixed_precision(profile_dir):
    prof = load_profile("testboard")
    assert prof.supported_weight_bits("ort") == [8]
    assert prof.supported_weight_bits("ort", allow_fallback=True) == [2, 4, 8]  # via MatMulNBits
    assert prof.supported_weight_bits("lite", acts=["dynamic"]) == [8]
    opts = prof.weight_options("ort", acts=["fp32"])
    assert {(o.bits, o.granularity) for o in opts} == {(8, "channel")}


def test_missing_key_is_named_with_its_table(tmp_path):
    """A profile without `schema = 1` used to say only "schema: missing required key"."""
    text = TEST_PROFILE.read_text()
    with pytest.raises(EdgeqError, match=r"\.toml: top level: required key 'schema' is missing$"):
        load_profile_file(_write(tmp_path, re.sub(r"(?m)^schema = \d+\n", "", text)))
    with pytest.raises(EdgeqError, match=r"\.toml: memory: required key 'ram_gib' is missing$"):
        load_profile_file(_write(tmp_path, text.replace("ram_gib = [1]\n", "")))
