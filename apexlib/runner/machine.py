"""This machine as a ``HardwareSpec`` (device=cpu runs: the CPU is the "device"), with its DRAM read
bandwidth measured now by the CPU kernels' probe, and the cost model a CPU engine predicts with when it
is given none (a roofline of this machine) or ``"roofline:this-machine"``. Needs torch (data plane).
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

from apexlib.costs import CostModel, ModelShape, RooflineCostModel, load_cost_model
from apexlib.costs.hardware import HardwareSpec

logger = logging.getLogger(__name__)

THIS_MACHINE = "roofline:this-machine"


def measure_dram_read_gbps(num_threads: int | None = None, megabytes: int = 256, repetitions: int = 5) -> float:
    """Median DRAM read bandwidth (GB/s) of the faster read loop of the CPU kernels' probe (needs torch).

    The buffer lies on 2 MiB pages where possible, like the CPU KV tier (apexlib.runner.host_memory).
    """
    import torch

    from apexlib.attention.dram_probe import measure_read_bandwidth
    from apexlib.runner.host_memory import host_empty

    buffer = host_empty((megabytes * 2**20 // 4,), torch.float32).fill_(1.0)
    median, _, _ = measure_read_bandwidth(buffer, num_threads, repetitions)
    return median


def this_machine(dram_gbps: float | None = None) -> HardwareSpec:
    """This machine with the CPU as the "device" (device=cpu runs): DRAM measured now unless given.

    Compute peaks are not measured (decode work is bandwidth-bound); they are rough AVX-512 FMA
    figures (2 x 16 fp32 FMA per cycle x 2 FLOP x ~2 GHz per core) and flagged as such.
    """
    from apexlib.core.host import cpu_info

    info = cpu_info()
    cores = int(info.get("cpu_affinity") or 1)
    today = datetime.date.today().isoformat()
    measured = f"measured {today} on {info['cpu_model']} ({cores} CPUs)"
    if dram_gbps is None:
        try:
            dram_gbps = measure_dram_read_gbps()
            dram_source = measured + " with apexlib.attention.dram_probe.measure_read_bandwidth (faster loop, median of 5, 256 MiB)"
        except (ImportError, RuntimeError, OSError) as error:
            logger.warning("DRAM probe unavailable (%s); assuming 25 GB/s", error)
            dram_gbps, dram_source = 25.0, "ASSUMPTION: 25 GB/s (2-core VMs this project ran on read 21-60 GB/s)"
    else:
        dram_source = "given by the caller"
    peak = cores * 2 * 16 * 2 * 2.0e9
    peak_source = "ASSUMPTION: cores x 2 FMA ports x 16 fp32 lanes x 2 FLOP x 2 GHz (not measured)"
    return HardwareSpec(
        name=f"this machine ({info['cpu_model']}, device=cpu)",
        memory_bandwidth_gbps=dram_gbps, peak_fp16_flops=peak, peak_fp32_flops=peak,
        memory_gib=_memory_gib(),
        pcie_gbps=dram_gbps / 2, cpu_name=info["cpu_model"], cpu_cores=cores, dram_gbps=dram_gbps,
        source=f"{measured}; device=cpu: the 'device' is this CPU, 'PCIe' is a host memcpy (read + write)",
        sources=(("memory_bandwidth_gbps", dram_source), ("dram_gbps", dram_source),
                 ("peak_fp16_flops", peak_source), ("peak_fp32_flops", peak_source),
                 ("pcie_gbps", "DRAM read / 2 (a memcpy reads and writes every byte)"),
                 ("cpu_cores", measured + ": os.sched_getaffinity")),
    )


def _memory_gib() -> float:
    from apexlib.core.host import memory_gib

    return memory_gib() or 1.0


def machine_cost_model(spec: CostModel | str | Path | None, shape: ModelShape, dtype: str, device: str) -> CostModel:
    """``load_cost_model(spec, ...)``, where ``"roofline:this-machine"`` and, with device=cpu, no cost model
    at all (logged: a stand-in until ``apex profile`` has run) mean a roofline of this machine, measured now."""
    if spec is None and device == "cpu":
        logger.warning("no cost_model given: predicting from a roofline of this machine; run `apex profile` for "
                       "measured tables")
        spec = THIS_MACHINE
    if spec == THIS_MACHINE:
        return RooflineCostModel(this_machine(), shape, dtype)
    return load_cost_model(spec, shape, dtype, device=device)
