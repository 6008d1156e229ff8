"""A measured notebook run as a Ray task on a node of the hardware kind its figures are about.

``make reproduce RAY_ADDRESS=...`` runs the simulated notebooks on the driver (their grids go to the cluster
through the sweep executor) and sends each measured notebook here: one task asks for a GPU of ``kind``
(``accelerator_type:<kind>``), executes the notebook with papermill on that node, in a copy of this checkout
shipped with the task (the code, the notebooks, and data/results so far, which a later notebook reads; not
the environments, build outputs or git store), and returns what the run wrote (its results directory, the figures, the executed
notebook) with the node's provenance. The driver unpacks it into this checkout and writes
``<results>/node.json``. A kind no node has is reported by name and the notebook is skipped; a failed run is
retried once, then reported with its node and its error.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apexlib.cluster.measured import MeasuredRuns, MeasuredTask, run_measured

logger = logging.getLogger(__name__)

#: Shipped to the nodes: the code, the notebooks and the results so far, quick runs' too (each node has its own
#: .venv).
SHIPPED = ("apexlib", "notebooks", "data", "build/quick", "pyproject.toml")
#: What a notebook run writes, relative to the checkout (``build/quick/...`` for quick runs).
OUTPUTS = ("data/results", "figures", "build/quick", "build/notebooks")


def _tar_outputs(root: Path, since: float) -> bytes:
    """The files under :data:`OUTPUTS` modified at or after ``since``, as a gzip tar relative to ``root``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for top in OUTPUTS:
            for path in sorted((root / top).rglob("*")) if (root / top).exists() else ():
                if path.is_file() and path.stat().st_mtime >= since:
                    tar.add(path, arcname=str(path.relative_to(root)))
    return buffer.getvalue()


def execute_notebook(notebook: str, parameters: Mapping[str, Any], checkout: bytes,
                     kernel: str = "python3") -> list[dict[str, Any]]:
    """The task's body: unpack ``checkout`` (:func:`pack_checkout`) into a fresh directory, run
    ``notebooks/<notebook>.ipynb`` there with papermill in this task's Python (the node's .venv); one row with
    the notebook's name and its outputs' archive."""
    import shutil
    import tempfile
    import time

    root = Path(tempfile.mkdtemp(prefix="apex-notebook-"))
    try:
        with tarfile.open(fileobj=io.BytesIO(checkout), mode="r:gz") as tar:
            tar.extractall(root, filter="data")
        return _execute_in(root, notebook, parameters, kernel, started=time.time() - 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


GPU_CHECK = "gpu-check"  # the run name of `apex gpu-check` (not a notebook): its parameters {"args": [...]}


def run_command(root: Path, run: str, parameters: Mapping[str, Any], kernel: str = "python3") -> list[str]:
    """What runs on the node for ``run``: papermill on ``notebooks/<run>.ipynb``, or ``apex gpu-check``."""
    if run == GPU_CHECK:
        args = [str(arg) for arg in parameters.get("args", ())]
        return [sys.executable, "-m", "apexlib.cli", "gpu-check", *([] if "--device" in args else ["--device", "cuda"]),
                *args]
    source = root / "notebooks" / f"{run}.ipynb"
    if not source.exists():
        raise FileNotFoundError(f"no notebook {source.name} in notebooks/")
    executed = root / "build" / "notebooks" / source.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "papermill", "--kernel", kernel, "--cwd", "notebooks", "--log-level", "WARNING",
               str(source), str(executed)]
    for name, value in parameters.items():
        command += ["-y", json.dumps({name: value})]
    return command


def _execute_in(root: Path, run: str, parameters: Mapping[str, Any], kernel: str,
                started: float) -> list[dict[str, Any]]:
    command = run_command(root, run, parameters, kernel)
    # the kernel imports apexlib from this shipped checkout, not from the node's own install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        last = (completed.stderr.strip() or completed.stdout.strip()).splitlines()[-1:] or [""]
        raise RuntimeError(f"{' '.join(command[1:4])} ... ({run}) exited with {completed.returncode}: {last[0]}")
    return [{"notebook": run, "archive": _tar_outputs(root, started)}]


def _results_directory(name: str) -> str | None:
    """The directory of an archived file under ``data/results/<experiment>/`` (or its ``build/quick/`` twin),
    where its ``node.json`` goes; None for other files."""
    parts = Path(name).parts
    inside = any(parts[at:at + 2] == ("data", "results") and len(parts) > at + 3 for at in range(len(parts)))
    return str(Path(name).parent) if inside else None


def pack_checkout(root: Path) -> bytes:
    """:data:`SHIPPED` of the checkout at ``root`` (without caches), as a gzip tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for top in SHIPPED:
            if (root / top).exists():
                tar.add(root / top, arcname=top,
                        filter=lambda info: None if "__pycache__" in info.name or ".ipynb_checkpoints" in info.name
                        else info)
    return buffer.getvalue()


def run_notebooks_on_nodes(notebooks: Mapping[str, str], parameters: Mapping[str, Any], root: Path,
                           num_gpus: float = 1.0, progress: bool = True) -> MeasuredRuns:
    """Run each ``{notebook: kind}`` on a node of its kind, one after the other (a later notebook reads an
    earlier one's results); unpack each run's outputs under ``root`` and write its ``node.json``."""
    runs = MeasuredRuns()
    for notebook, kind in notebooks.items():
        checkout = pack_checkout(root)  # again for each: it carries the results of the notebooks before it
        one = run_measured([MeasuredTask(notebook, kind, execute_notebook, (notebook, dict(parameters), checkout),
                                         num_gpus=num_gpus)], progress=progress)
        runs.failures += one.failures
        runs.missing_kinds += [k for k in one.missing_kinds if k not in runs.missing_kinds]
        for row in one.rows:
            archive = row.pop("archive")
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                names = tar.getnames()
                tar.extractall(root, filter="data")
            for directory in sorted(set(filter(None, map(_results_directory, names)))):
                (root / directory / "node.json").write_text(json.dumps(row, indent=1, default=str) + "\n")
            logger.info("%s ran on %s (%s): %d file(s)", notebook, row["node_hostname"], row["node_gpu"], len(names))
            runs.rows.append({**row, "files": len(names)})
    return runs


def main(argv: list[str] | None = None) -> int:
    """``python -m apexlib.cluster.notebooks NOTEBOOK=KIND ... [-p NAME VALUE]...``: exit 1 when a run failed
    or a kind was missing (the others still ran and their outputs are in place)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m apexlib.cluster.notebooks",
                                     description="run measured notebooks on Ray nodes of their hardware kind")
    parser.add_argument("runs", nargs="+", help="NOTEBOOK=KIND, e.g. 01-profile-hardware=T4 (kind cpu: any node); "
                                                "gpu-check=KIND runs `apex gpu-check` there")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter (a YAML/JSON value, as papermill's -p)")
    parser.add_argument("--gpu-check-args", default="", help="arguments of apex gpu-check (e.g. --smoke)")
    parser.add_argument("--num-gpus", type=float, default=1.0, help="GPUs each run asks for (0: a CPU rehearsal)")
    parser.add_argument("--root", default=".", help="the checkout (default: the current directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    notebooks = {}
    for run in args.runs:
        notebook, _, kind = run.partition("=")
        if not kind:
            parser.error(f"runs: {run!r} must be NOTEBOOK=KIND (e.g. 01-profile-hardware=T4)")
        notebooks[notebook.removesuffix(".ipynb").removeprefix("notebooks/")] = kind
    parameters = {name: _value(value) for name, value in args.parameter}
    if GPU_CHECK in notebooks and len(notebooks) > 1:
        parser.error("runs: gpu-check runs alone (its parameters are --gpu-check-args, not -p)")
    if GPU_CHECK in notebooks:
        parameters = {"args": args.gpu_check_args.split()}
    runs = run_notebooks_on_nodes(notebooks, parameters, Path(args.root).resolve(), num_gpus=args.num_gpus)
    for row in runs.rows:
        print(f"{row['task']}: ran on {row['node_hostname']} ({row['node_gpu'] or 'no GPU'}, {row['node_cpu']}), "  # noqa: T201
              f"{row['files']} file(s)")
    if runs.report():
        print(runs.report(), file=sys.stderr)  # noqa: T201
    return 1 if runs.failures else 0


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"True": True, "False": False}.get(text, text)


if __name__ == "__main__":
    sys.exit(main())
