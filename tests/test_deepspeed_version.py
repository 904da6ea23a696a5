"""Another DeepSpeed than the tested one: refused with the fix named, or run with a warning when the user opts in."""

import warnings

import pytest

from ds_scalora.checkpoint.deepspeed_files import TESTED_DEEPSPEED
from ds_scalora.zero.state_access import ALLOW_UNTESTED, UnsupportedConfig, check_deepspeed_version


def test_the_tested_version_passes_silently(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_deepspeed_version(TESTED_DEEPSPEED)


def test_another_version_is_refused_naming_the_install_and_the_override(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED, raising=False)
    with pytest.raises(UnsupportedConfig) as e:
        check_deepspeed_version("0.18.0")
    assert f"deepspeed=={TESTED_DEEPSPEED}" in str(e.value) and f"{ALLOW_UNTESTED}=1" in str(e.value)
    assert "0.18.0" in str(e.value)


def test_the_override_warns_instead(monkeypatch):
    monkeypatch.setenv(ALLOW_UNTESTED, "1")
    with pytest.warns(UserWarning, match="0.18.0"):
        check_deepspeed_version("0.18.0")


def test_the_pin_in_pyproject_is_the_tested_version():
    """pyproject.toml cannot import the constant, so the two spellings of the pin are held equal here."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.findall(r'"deepspeed==([0-9.]+)"', text) == [TESTED_DEEPSPEED]
