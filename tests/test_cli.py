"""The `apex` command line: tiny, generate, env."""

from __future__ import annotations

import json
import subprocess
import sys

from apexlib.cli import main


def test_apex_tiny_then_generate(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["tiny", "--out", str(out), "--preset", "mha"]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "Once upon a time", "--max-tokens", "6",
                 "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("'Once upon a time' -> '") and len(line) > len("'Once upon a time' -> ''")


def test_apex_generate_reports_bad_input(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_apex_console_script_env():
    result = subprocess.run([sys.executable, "-m", "apexlib.cli", "env"], capture_output=True, text=True, check=True)
    info = json.loads(result.stdout)
    assert info["torch"] and info["cpu_count"] >= 1 and "simd" in info


def test_every_engine_command_takes_every_engine_argument_from_one_table():
    """generate, serve, bench and simulate build their engine flags from EngineArgs' fields."""
    import argparse
    import dataclasses

    from apexlib.cli import build_parser
    from apexlib.engine.args import ENGINE_ARG_HELP, EngineArgs

    assert set(ENGINE_ARG_HELP) == {f.name for f in dataclasses.fields(EngineArgs)}
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    simulate_skips = {"cpu_attention_threads", "cpu_attention_cpus", "cpu_attention_timeout", "attention_backend",
                      "profile_subtasks", "seed"}
    for name in ("generate", "serve", "bench", "simulate"):
        dests = {action.dest for action in commands[name]._actions}
        expected = {f.name for f in dataclasses.fields(EngineArgs)} - (simulate_skips if name == "simulate" else set())
        assert expected <= dests, (name, sorted(expected - dests))
    options = commands["bench"].parse_args(["--policy", "apex", "--policy-option", "max_stall_iterations=8",
                                            "--policy-option", "enable_pipeline=false", "--cost-model", "zero"])
    from apexlib.cli import engine_kwargs

    kwargs = engine_kwargs(options, num_gpu_blocks=None)
    assert kwargs["policy_options"] == {"max_stall_iterations": 8, "enable_pipeline": False}
    assert EngineArgs(**kwargs).policy_options.max_stall_iterations == 8
    assert kwargs["cost_model"] == "zero"


def test_a_bad_policy_option_is_one_line_naming_it(capsys):
    from apexlib.cli import main

    assert main(["simulate", "--cost-model", "zero", "--policy", "neo", "--policy-option", "mode=fast",
                 "--num-requests", "2"]) == 2
    assert "policy 'neo' has no option(s) ['mode']" in capsys.readouterr().err


def test_simulate_bound_adds_a_bound_row_above_every_policy(tmp_path, capsys):
    import pandas as pd

    from apexlib.cli import main

    assert main(["simulate", "--cost-model", "roofline:t4", "--model", "llama-2-7b", "--dtype", "float16",
                 "--policy", "gpu_only", "apex", "--workload", "t4-decode-heavy", "--num-requests", "8",
                 "--rate", "0", "--gpu-kv-gib", "0.5", "--cpu-kv-gib", "2", "--out", str(tmp_path),
                 "--experiment", "b", "--no-iterations", "--bound"]) == 0
    assert "fraction of bound" in capsys.readouterr().out
    rows = pd.read_csv(tmp_path / "b" / "rows.csv")
    summary = rows[rows["row_type"] == "summary"].set_index("policy")["output_throughput"]
    assert set(summary.index) == {"gpu_only", "apex", "bound"}
    assert summary["bound"] >= summary[["gpu_only", "apex"]].max()
