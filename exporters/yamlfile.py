"""The one YAML loader of tagway's files (the gateway config, the DSN lookup's view of it, replay specs): a
mapping or one line saying what is wrong, always in the same form:

    <file>: invalid YAML at line <l>, column <c>: <what was expected>
    <file>: the top level must be a mapping
    config file '<file>' does not exist
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["YamlFileError", "load_mapping", "load_yaml", "item_lines"]


class _UniqueKeys:
    """A mapping that names a key twice is an error (YAML 1.2 says keys are unique; PyYAML keeps the last one, so a
    second `server:` section would silently replace the first)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[attr-defined]
            if key in seen:  # equal in Python (1, 1.0, true) is one key too: a dict would keep only the last
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (first at line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)  # type: ignore[misc]


class _FastLoader(_UniqueKeys, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml when PyYAML has it: ~10x faster."""


class _PyLoader(_UniqueKeys, yaml.SafeLoader):
    """The pure-Python parser: it words its errors the same on every machine."""


_LOADER = _FastLoader


class YamlFileError(ValueError):
    """The file is missing, unreadable, not YAML, or not a mapping. `str(e)` is one line."""


def load_yaml(path: str | os.PathLike[str], what: str = "config file") -> Any:
    """The YAML document in the file at `path` (None when empty), or a YamlFileError of one line."""
    p = Path(path)
    if not p.is_file():
        raise YamlFileError(f"{what} {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        try:
            return yaml.load(text, Loader=_LOADER)
        except yaml.YAMLError:
            return yaml.load(text, Loader=_PyLoader)  # the pure-Python parser words its errors the same everywhere
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise YamlFileError(f"{p}: invalid YAML{where}: {e.problem or e.context or 'unreadable'}") from None
    except yaml.YAMLError as e:
        raise YamlFileError(f"{p}: invalid YAML: {e}") from None
    except UnicodeDecodeError:
        raise YamlFileError(f"{p}: not UTF-8 text") from None
    except OSError as e:
        raise YamlFileError(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None


def load_mapping(path: str | os.PathLike[str], what: str = "config file") -> dict[str, Any]:
    """The top-level mapping of the YAML file at `path` ({} for an empty file). `what` names the file in the
    messages that cannot quote its content ('config file', 'spec')."""
    loaded = load_yaml(path, what)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise YamlFileError(f"{Path(path)}: the top level must be a mapping")
    return loaded


def item_lines(path: str | os.PathLike[str]) -> list[int]:
    """The line (1-based) where each item of the file's top-level list starts, to point at bad entries (read once
    for all of them); [] when the file is not a readable YAML list."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=_LOADER)
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return []
    return [n.start_mark.line + 1 for n in node.value] if isinstance(node, yaml.SequenceNode) else []
