"""``scripts/setup.sh`` runs pip only when what it installs from changed: the script itself, run against a
stand-in ``.venv/bin/python`` that logs how it was called (and can be told to fail, as pip does)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# a venv's python as setup.sh uses it: -VV for the stamp, -m pip for the installs
if [ "$1" = "-VV" ]; then echo "Python 3.11.7 (stand-in)"; exit 0; fi
echo "$*" >> "$(dirname "$0")/../calls.log"
if [ -f "$(dirname "$0")/../fail" ] && [ "$*" != "-m pip install -q --upgrade pip" ]; then exit 1; fi
"""


def _project(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def _setup(project: Path, **env) -> tuple[int, list[str]]:
    log = project / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=project, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=30)
    return done.returncode, log.read_text().splitlines() if log.exists() else []


def test_pip_runs_once_then_again_only_when_its_inputs_change(tmp_path):
    project = _project(tmp_path)
    install = "-m pip install -q -c constraints.txt -e .[test]"
    assert _setup(project) == (0, ["-m pip install -q --upgrade pip", install])
    assert _setup(project) == (0, [])  # nothing changed: no pip at all
    (project / "constraints.txt").write_text((project / "constraints.txt").read_text() + "\n# changed\n")
    assert _setup(project)[1][-1] == install
    assert _setup(project) == (0, [])
    assert _setup(project, FASTLOAD_SETUP_FORCE="1")[1][-1] == install


def test_a_failed_install_leaves_no_stamp_so_the_next_call_installs_again(tmp_path):
    project = _project(tmp_path)
    (project / ".venv" / "fail").touch()
    rc, calls = _setup(project)
    assert rc != 0 and calls[-1].startswith("-m pip install -q -c constraints.txt")
    assert not (project / ".venv" / ".fastload-setup").exists()
    (project / ".venv" / "fail").unlink()
    rc, calls = _setup(project)
    assert rc == 0 and calls[-1].startswith("-m pip install -q -c constraints.txt")
