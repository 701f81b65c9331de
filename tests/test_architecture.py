"""The import contract of pyproject.toml ([tool.importlinter], docs/architecture.md): layers point
one way and no package's modules import each other in a cycle. A change that imports upward fails
here, with lint-imports' report naming the import and its line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The console script, run by this interpreter, on this checkout's package (not an installed one).
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_import_contract_is_kept():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_contract_covers_every_package_and_waves_nothing_through():
    """Every top-level package and module must have a layer (exhaustive), and no import is
    excused with ignore_imports."""
    from importlinter.api import read_configuration

    contracts = read_configuration(str(ROOT / "pyproject.toml"))["contracts_options"]
    layers = next(c for c in contracts if c["type"] == "layers")
    assert layers["exhaustive"] == "True"
    assert not any("ignore_imports" in c for c in contracts)


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check can fail: a copy of the package whose records module imports the job layer."""
    copy = tmp_path / "online_stablerep"
    shutil.copytree(ROOT / "online_stablerep", copy,
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    records = copy / "records.py"
    records.write_text(records.read_text() + "\nimport online_stablerep.jobs.train  # noqa\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", LINT, "--no-cache"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "online_stablerep.records -> online_stablerep.jobs.train" in result.stdout
