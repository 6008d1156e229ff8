"""Ray as the executor of a sweep and the placer of measured runs, on a local cluster started here.

The cluster has 2 CPUs and declares a fake ``accelerator_type:T4`` resource, the rehearsal of a lab with a T4
node. Needs the optional Ray (``make test-scale-out``); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import platform

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (optional: make test-scale-out or "
                                        "pip install 'apexlib[cluster]')")
pd = pytest.importorskip("pandas")

from apexlib.cluster.executor import RayExecutor, choose_executor  # noqa: E402
from apexlib.cluster.measured import MeasuredTask, run_measured  # noqa: E402
from apexlib.costs import datasheet_roofline  # noqa: E402
from apexlib.costs.assumptions import scenario_cost_model  # noqa: E402
from apexlib.sim.batch import SimulationJob, simulate_rows  # noqa: E402
from apexlib.workloads import input_output_grid  # noqa: E402


@pytest.fixture(scope="module")
def local_cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, resources={"accelerator_type:T4": 1}, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def notebook03_jobs() -> list[SimulationJob]:
    """A corner of notebook 03's grid, built as the notebook builds it (two settings, two scenarios, every
    policy on the T4)."""
    jobs = []
    for workload in input_output_grid([128], [64, 256], num_requests=12, seed=0):
        for scenario in ("central", "offload-adverse"):
            cost = scenario_cost_model(datasheet_roofline("t4", "llama-2-7b"), scenario)
            for policy in ("gpu_only", "neo_published", "neo", "apex"):
                jobs.append(SimulationJob(
                    workload, cost, dict(model="llama-2-7b", policy=policy, cpu_kv_gib=20.0, dtype="float16",
                                         max_model_len=workload.max_total_len),
                    dict(hardware="t4", model="llama-2-7b", policy=policy, scenario=scenario,
                         setting=workload.name.removeprefix("grid-"))))
    return jobs


def test_grid_on_ray_has_the_process_pools_rows(local_cluster):
    jobs = notebook03_jobs()
    pooled = pd.DataFrame(simulate_rows(jobs, workers=2, progress=False, executor="process"))
    on_ray = pd.DataFrame(simulate_rows(jobs, progress=False, executor=RayExecutor(max_in_flight=3)))
    assert len(pooled) == len(jobs) == 16
    # every column but when it ran and how long it took (and the checkout a Ray worker sees)
    drop = ["date_utc", "wall_time_s", "git_commit"]
    assert set(drop) <= set(pooled.columns)
    pd.testing.assert_frame_equal(pooled.drop(columns=drop), on_ray.drop(columns=drop), check_exact=True)


def test_ray_address_picks_ray(monkeypatch, local_cluster):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.delenv("APEX_EXECUTOR", raising=False)
    assert choose_executor().name == "ray"
    jobs = notebook03_jobs()[:3]
    keep = ("policy", "scenario", "output_throughput", "executor")
    assert [[row[k] for k in keep] for row in simulate_rows(jobs, progress=False)] == \
        [[row[k] for k in keep] for row in simulate_rows(jobs, workers=1, progress=False, executor="process")]


def test_measured_runs_land_on_their_kind_with_provenance(local_cluster, tmp_path):
    marker = tmp_path / "failed-once"

    def profile(batch):
        return [{"batch": batch, "seconds": 0.001 * batch}]

    def flaky():
        if not marker.exists():
            marker.write_text("1")
            raise RuntimeError("injected transient fault")
        return [{"ok": True}]

    def broken():
        raise RuntimeError("injected permanent fault")

    tasks = [MeasuredTask(f"profile-b{b}", "T4", profile, (b,), num_gpus=0) for b in (1, 4)]
    tasks += [MeasuredTask("flaky", "T4", flaky, num_gpus=0), MeasuredTask("broken", "T4", broken, num_gpus=0),
              MeasuredTask("a10g-run", "A10G", profile, (8,), num_gpus=0),
              MeasuredTask("anywhere", "cpu", profile, (2,))]
    runs = run_measured(tasks, progress=False)

    assert runs.missing_kinds == ["A10G"]
    by_task = {row["task"]: row for row in runs.rows}
    assert list(by_task) == ["profile-b1", "profile-b4", "flaky", "anywhere"]  # the tasks' order
    assert by_task["profile-b4"]["seconds"] == pytest.approx(0.004)
    for row in runs.rows:
        assert row["node_hostname"] == platform.node() and row["node_cpu"]
    assert by_task["profile-b1"]["node_kind"] == "T4" and by_task["profile-b1"]["attempt"] == 1
    assert by_task["flaky"]["attempt"] == 2  # retried once, then it ran
    failures = {failure.label: failure for failure in runs.failures}
    assert set(failures) == {"broken", "a10g-run"}
    assert failures["broken"].attempts == 2 and failures["broken"].node == platform.node()
    assert "injected permanent fault" in failures["broken"].error
    report = runs.report()
    assert "no node of kind A10G" in report and "broken [T4] failed on" in report


def test_a_measured_notebook_runs_on_a_node_of_its_kind(local_cluster, tmp_path):
    """The rehearsal of ``make reproduce RAY_ADDRESS=...``: a notebook asking for a T4 runs on the fake-T4
    node in the checkout Ray shipped there; its results come back with the node's provenance, and a kind no
    node has is reported by name while the rest goes on."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("papermill")
    from apexlib.cluster.notebooks import run_notebooks_on_nodes

    (tmp_path / "notebooks").mkdir()
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("value = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import os, platform, pathlib\n"
                                  "out = pathlib.Path('../data/results/99-probe'); out.mkdir(parents=True)\n"
                                  "(out / 'rows.csv').write_text(f'value,host,cwd\\n{value},{platform.node()},'\n"
                                  "                              f'{os.getcwd()}\\n')")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "notebooks" / "99-probe.ipynb")
    nbformat.write(notebook, tmp_path / "notebooks" / "98-elsewhere.ipynb")

    runs = run_notebooks_on_nodes({"99-probe": "T4", "98-elsewhere": "A10G"}, {"value": 7}, tmp_path, num_gpus=0,
                                  progress=False)

    assert runs.missing_kinds == ["A10G"] and [f.label for f in runs.failures] == ["98-elsewhere"]
    [row] = runs.rows
    assert row["task"] == "99-probe" and row["node_kind"] == "T4" and row["node_hostname"] == platform.node()
    value, host, cwd = (tmp_path / "data/results/99-probe/rows.csv").read_text().splitlines()[1].split(",")
    assert value == "7" and host == platform.node()
    assert not cwd.startswith(str(tmp_path))  # it ran in the copy Ray shipped to the node, not in place
    node = json.loads((tmp_path / "data/results/99-probe/node.json").read_text())
    assert node["node_kind"] == "T4" and node["node_cpu"] and node["task"] == "99-probe"
    assert (tmp_path / "build/notebooks/99-probe.ipynb").exists()


def test_the_gpu_check_runs_on_a_node_of_its_kind(local_cluster, tmp_path):
    """``make gpu-check-ray``'s path, rehearsed as ``apex gpu-check --device cpu --size tiny`` on the fake T4."""
    from apexlib.cluster.notebooks import GPU_CHECK, run_notebooks_on_nodes

    out = "data/results/gpu-check/rehearsal"
    runs = run_notebooks_on_nodes({GPU_CHECK: "T4"}, {"args": ["--device", "cpu", "--size", "tiny", "--skip-tests",
                                                               "--out", out]}, tmp_path, num_gpus=0, progress=False)
    assert not runs.failures, runs.report()
    [row] = runs.rows
    assert row["node_kind"] == "T4" and row["node_hostname"] == platform.node()
    assert (tmp_path / out / "comparison.csv").exists() and (tmp_path / out / "steps.json").exists()
    assert json.loads((tmp_path / out / "node.json").read_text())["task"] == GPU_CHECK
