"""Create .venv and install the package with its test extras, once.

Concurrent runs (`make serve` and `make test` started together on a fresh
clone) take a lock, so the second waits for the first instead of installing
into the same environment at the same time.

Usage: python tools/install_venv.py VENV_DIR STAMP_FILE
"""

from __future__ import annotations

import fcntl
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MINIMUM_PYTHON = (3, 11)


def install(venv: pathlib.Path, stamp: pathlib.Path) -> None:
    venv_python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv_python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True
    )
    subprocess.run(
        [str(venv_python), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]"], check=True
    )
    stamp.touch()


def main() -> None:
    if sys.version_info < MINIMUM_PYTHON:
        raise SystemExit(
            f"Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} or newer is required, "
            f"found {sys.version.split()[0]}; run make with PYTHON=python3.11 or newer"
        )
    venv, stamp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    pyproject = ROOT / "pyproject.toml"
    with open(ROOT / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.stat().st_mtime >= pyproject.stat().st_mtime:
            return  # Another run installed it while this one waited.
        install(venv, stamp)


if __name__ == "__main__":
    main()
