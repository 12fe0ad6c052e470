"""Every module imports, and the light ones stay light."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import mmalign


def test_every_module_imports() -> None:
    names = [m.name for m in pkgutil.walk_packages(mmalign.__path__, prefix="mmalign.")]
    assert "mmalign.cli" in names and "mmalign.recipes.sft" in names
    for name in names:
        importlib.import_module(name)


def test_records_and_world_do_not_import_torch() -> None:
    code = "import sys, mmalign.types, mmalign.lab.world, mmalign.eval.pope_score; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
