"""One YAML loader (exporters/yamlfile.py) behind the gateway config, the DSN lookup and replay specs: a broken file
gets the same one-line message (file, line, column, what was expected) from each."""
from __future__ import annotations

import pytest

from exporters.dsn import DsnConfigError, resolve_dsn
from gateway.config import ConfigError, load_config
from replay.spec import SpecError, load_spec_data


def messages(path) -> list[str]:
    """The message each reader of YAML files gives for `path`."""
    out = []
    for load, error in ((load_config, ConfigError), (lambda p: resolve_dsn(config=p, environ={}), DsnConfigError),
                        (load_spec_data, SpecError)):
        with pytest.raises(error) as e:
            load(str(path))
        out.append(str(e.value))
    return out


@pytest.mark.parametrize("text,expected", [
    ("storage: [unclosed\n", "invalid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("a: 1\n  b: 2\n", "invalid YAML at line 2, column 4: mapping values are not allowed here"),
    ("a: 'open\n", "invalid YAML at line 2, column 1: found unexpected end of stream"),
    ("- a\n- b\n", "the top level must be a mapping"),
    # PyYAML keeps the last of two equal keys: a second `server:` silently replaced the first
    ("server:\n  port: 4000\nmodels: []\nserver:\n  port: 5000\n",
     "invalid YAML at line 4, column 1: the key 'server' is given twice (first at line 1)"),
    ("storage:\n  data_dir: a\n  data_dir: b\n",
     "invalid YAML at line 3, column 3: the key 'data_dir' is given twice (first at line 2)"),
])
def test_one_error_format_for_every_yaml_file(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert messages(path) == [f"{path}: {expected}"] * 3


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    assert messages(path) == [f"{path}: not UTF-8 text"] * 3


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    config, dsn, spec = messages(path)
    assert config == dsn == f"config file {str(path)!r} does not exist"
    assert spec == f"spec {str(path)!r} does not exist"


def test_merge_keys_still_override(tmp_path):
    """`<<: *anchor` then a key of the anchor's: YAML's merge, not a key given twice."""
    from exporters.yamlfile import load_mapping
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b\n  a: 1\n  c: 3\nx:\n  <<: *b\n  a: 2\n")
    assert load_mapping(path) == {"base": {"a": 1, "c": 3}, "x": {"a": 2, "c": 3}}
