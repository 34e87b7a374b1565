"""`platform/` must stay a plain folder: a package there shadows the stdlib module."""

import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_folder_has_no_init():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "neighbor_diffusion" / "__init__.py").exists()


def test_import_platform_is_stdlib():
    # pytest puts platform/ and the repo root on sys.path (pyproject); the stdlib must still win
    assert "platform" in sys.stdlib_module_names
    assert callable(platform.system) and platform.system()
    assert Path(platform.__file__).parent != ROOT / "platform"
