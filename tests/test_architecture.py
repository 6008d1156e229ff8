"""The layering of docs/ARCHITECTURE.md holds: import-linter's contracts in pyproject.toml (layers, a
torch-free control plane) and a simulation that never imports torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is not installed in this venv (requirements/base.txt pins it)"
    completed = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert "2 kept, 0 broken" in completed.stdout


def test_the_contracts_can_fail(tmp_path):
    """A copy of the package where the scheduler imports torch breaks the torch-free contract."""
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    shutil.copytree(ROOT / "apexlib", tmp_path / "apexlib", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    scheduler = tmp_path / "apexlib" / "engine" / "scheduler.py"
    scheduler.write_text(scheduler.read_text() + "\n\ndef _leak():\n    import torch  # noqa: F401\n")
    completed = subprocess.run([lint_imports, "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert completed.returncode != 0
    assert "apexlib.engine.scheduler is not allowed to import torch" in completed.stdout
