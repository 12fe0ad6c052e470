"""Loading a function the user names on the command line: ``module.path:function`` or ``path/to/file.py:function``.

A file is executed when it is loaded, so a function is only ever named on the command line (``--judge``), never by a
data or configuration file.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmalign.errors import ConfigError


def load_function(spec: str, what: str = "judge") -> Callable[..., Any]:
    """The function ``spec`` names.

    Raises:
        ConfigError: the spec is malformed, or the module, file or function cannot be found, or is not callable.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"{what} {spec!r}: expected 'module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.exists():
                raise ConfigError(f"{what} {spec!r}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"mmalign_user_{path.stem}", path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise ConfigError(f"{what} {spec!r}: cannot import {target}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{what} {spec!r}: {target} has no function {name!r}")
    return fn
