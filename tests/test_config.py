"""Configs by path or, for the shipped ones (configs/, installed as package data), by bare name
from any working folder."""

from __future__ import annotations

import pytest

from hellochat_jax.core import config


def test_a_shipped_config_is_found_by_bare_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny", "tiny.yaml"):
        path = config.resolve_path(name)
        assert path.is_file() and path.name == "tiny.yaml" and path.parent.name == "configs"
    assert "tiny" in config.shipped_config_names()


def test_a_path_is_taken_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text("steps: 1\n")
    assert config.resolve_path("tiny.yaml").resolve() == (tmp_path / "tiny.yaml").resolve()
    assert config.resolve_path("sub/tiny.yaml").as_posix() == "sub/tiny.yaml"  # not a bare name: never swapped


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(config.ConfigError, match="usable by name: .*tiny"):
        config.load(dict, "no-such-config")
