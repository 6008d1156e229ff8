"""Which python ``make gpu-check`` runs: one that already has a CUDA torch, else ``.venv`` built if it can be.

A lent GPU machine may have no network: building ``.venv`` there fails after minutes of retries. So,
in order: the python named by ``GPU_PYTHON``; the first candidate (``.venv``'s python, then the system's
``python3``) whose torch sees a CUDA device and which has the other runtime requirements; else
``build`` when the package index answers (the Makefile then runs ``make setup`` and uses ``.venv``);
else an error that says what each candidate lacked and how to name a python.

Run as ``python3 -m apexlib.bench.gpu_python [--given PY] CANDIDATE...``: prints the python to use (or
``build``) on stdout, the reason on stderr; exit 2 when there is none. Torch-free: each candidate is
probed in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

#: Imported by the probe: torch and what gpu-check needs besides it (apexlib itself runs from the checkout).
REQUIRED_MODULES = ("torch", "transformers", "safetensors", "numpy", "pandas", "pytest")
PROBE = (
    "import importlib, sys\n"
    "missing = []\n"
    f"for name in {REQUIRED_MODULES!r}:\n"
    "    try:\n"
    "        importlib.import_module(name)\n"
    "    except Exception as error:\n"
    "        missing.append(f'{name} ({type(error).__name__})')\n"
    "if missing:\n"
    "    print('lacks ' + ', '.join(missing)); sys.exit(1)\n"
    "import torch\n"
    "if not torch.cuda.is_available():\n"
    "    print(f'torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device'); sys.exit(1)\n"
    "print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}')\n"
)
DEFAULT_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class Choice:
    python: str | None  # a python to run, "build", or None (nothing usable)
    reason: str


def probe_python(python: str, timeout_s: float = 120.0) -> tuple[bool, str]:
    """(usable, what it has or lacks) for one python executable."""
    if shutil.which(python) is None and not os.access(python, os.X_OK):
        return False, "not found"
    try:
        result = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as error:
        return False, f"could not run ({type(error).__name__}: {error})"
    text = (result.stdout.strip().splitlines() or [result.stderr.strip() or f"exit {result.returncode}"])[-1]
    return result.returncode == 0, text


def pip_index() -> str:
    """pip's index URL: ``PIP_INDEX_URL``, else pip's configuration (``pip config``), else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_INDEX
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else DEFAULT_INDEX


def index_reachable(timeout_s: float = 3.0) -> bool:
    """Whether pip's package index answers (:func:`pip_index`); a ``file:`` index is a local directory."""
    url = urlparse(pip_index())
    if url.scheme == "file":
        return os.path.isdir(url.path)
    host = url.hostname or "pypi.org"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def choose_python(given: str | None, candidates: Sequence[str],
                  probe: Callable[[str], tuple[bool, str]] | None = None,
                  network: Callable[[], bool] | None = None) -> Choice:
    """The python ``make gpu-check`` should use (see the module doc); ``probe``/``network`` default to
    :func:`probe_python` and :func:`index_reachable`."""
    probe = probe or probe_python
    network = network or index_reachable
    if given:
        usable, detail = probe(given)
        if not usable:
            return Choice(None, f"GPU_PYTHON={given}: {detail}")
        return Choice(given, f"GPU_PYTHON={given}: {detail}")
    notes = []
    for candidate in candidates:
        usable, detail = probe(candidate)
        if usable:
            return Choice(candidate, f"{candidate}: {detail}")
        notes.append(f"{candidate}: {detail}")
    if network():
        return Choice("build", "no python with a CUDA torch (" + "; ".join(notes) + "); the package index answers: "
                      "building .venv")
    return Choice(None, "no python with a CUDA torch (" + "; ".join(notes) + ") and the package index does not "
                  "answer, so .venv cannot be built here; name a python that has a CUDA torch and the "
                  "requirements: make gpu-check GPU_PYTHON=/path/to/python")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apexlib.bench.gpu_python", description=__doc__.split("\n")[0])
    parser.add_argument("--given", default="", help="GPU_PYTHON (empty: choose)")
    parser.add_argument("candidates", nargs="*", help="pythons to probe, in order")
    args = parser.parse_args(argv)
    choice = choose_python(args.given or None, args.candidates)
    sys.stderr.write(f"gpu-check: {choice.reason}\n")
    if choice.python is None:
        return 2
    sys.stdout.write(choice.python + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
