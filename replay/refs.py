"""Late-bound references of the form `module:attribute` (user evaluators, the in-process gateway app)."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_ref"]


def load_ref(ref: str) -> Any:
    """Import `module` and return its `attribute`. Raises ImportError (with the reason) when either is missing."""
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise ImportError(f"{ref!r} is not of the form module:attribute")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except AttributeError as e:
        raise ImportError(str(e)) from None
