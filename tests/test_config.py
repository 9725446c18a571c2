import pytest

from als.config import Config, load_config
from als.errors import ConfigError


def test_missing_default_is_fine_missing_named_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr("als.config.DEFAULT_CONFIG", tmp_path / "absent.toml")
    assert load_config(None) == Config()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_values_and_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[resolve]\ntimeout = 5\nallow_unverified = true\n[fuse]\nattr_timeout = 1.5\n")
    c = load_config(p)
    assert c.resolve.timeout == 5.0 and c.resolve.allow_unverified and c.fuse.attr_timeout == 1.5
    for text, msg in [("[resolve]\ntimeot = 1\n", "unknown key resolve.timeot"),
                      ("[resolve]\ntimeout = 'x'\n", "resolve.timeout must be a float"),
                      ("[cache]\nmemory_bytes = -1\n", "must not be negative"),
                      ("[nope]\n", "unknown key nope"), ("resolve = 3\n", "must be a table"),
                      ("[resolve\n", "c.toml")]:
        p.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_config(p)


def test_shipped_sample_config_matches_defaults():
    from pathlib import Path
    assert load_config(Path(__file__).parents[1] / "config" / "config.toml") == Config()
