"""Another DeepSpeed than the tested one: refused with the fix named, or run with a warning when the user opts in."""

import warnings

import pytest

from ds_scalora.checkpoint.deepspeed_files import OLDEST_DEEPSPEED, TESTED_DEEPSPEED
from ds_scalora.zero.state_access import ALLOW_UNTESTED, UnsupportedConfig, check_deepspeed_version


def test_the_tested_range_passes_silently(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for version in (OLDEST_DEEPSPEED, "0.19.7", TESTED_DEEPSPEED, TESTED_DEEPSPEED + "+cu124"):
            check_deepspeed_version(version)
    for version in ("0.19.5", "0.19.9", "0.20.0"):
        with pytest.raises(UnsupportedConfig):
            check_deepspeed_version(version)


def test_another_version_is_refused_naming_the_install_and_the_override(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED, raising=False)
    with pytest.raises(UnsupportedConfig) as e:
        check_deepspeed_version("0.18.0")
    assert f"deepspeed=={TESTED_DEEPSPEED}" in str(e.value) and f"{ALLOW_UNTESTED}=1" in str(e.value)
    assert f"{OLDEST_DEEPSPEED} to {TESTED_DEEPSPEED}" in str(e.value)
    assert "0.18.0" in str(e.value)


def test_the_override_warns_instead(monkeypatch):
    monkeypatch.setenv(ALLOW_UNTESTED, "1")
    with pytest.warns(UserWarning, match="0.18.0"):
        check_deepspeed_version("0.18.0")


def test_the_pin_in_pyproject_is_the_tested_range():
    """pyproject.toml cannot import the constants, so the two spellings of the range are held equal here."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.findall(r'"deepspeed>=([0-9.]+),<=([0-9.]+)"', text) == [(OLDEST_DEEPSPEED, TESTED_DEEPSPEED)]
