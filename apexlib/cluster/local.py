"""A local Ray cluster held by this process, for rehearsing the cluster recipes on one machine.

``python -m apexlib.cluster.local --num-cpus 2 --fake-kind T4`` starts Ray in this process with
``accelerator_type:T4`` declared on the CPU (the rehearsal of a T4 node), prints the address a driver passes
as ``RAY_ADDRESS``, and holds the cluster until it is interrupted (SIGINT or SIGTERM); then the cluster
stops with it. Runs that ask for a GPU cannot be placed on it: rehearse with ``RAY_GPUS=0``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from apexlib.cluster.executor import ray_module
from apexlib.cluster.measured import accelerator_resource


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apexlib.cluster.local", description=__doc__.splitlines()[0])
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--fake-kind", nargs="*", default=["T4"], help="hardware kinds to declare (default T4)")
    parser.add_argument("--address-file", default=None, help="also write the address to this file")
    args = parser.parse_args(argv)
    if args.num_cpus < 1:
        parser.error(f"--num-cpus must be >= 1, got {args.num_cpus}")
    ray = ray_module()
    ray.init(num_cpus=args.num_cpus, resources={accelerator_resource(kind): 1 for kind in args.fake_kind},
             include_dashboard=False)
    address = ray.get_runtime_context().gcs_address
    if args.address_file:
        with open(args.address_file, "w") as out:
            out.write(address + "\n")
    print(address, flush=True)  # noqa: T201
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
