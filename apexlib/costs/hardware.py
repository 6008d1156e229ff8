"""Hardware descriptions for the roofline cost model: GPUs we do not have, and this machine, measured.

Torch-free. Every number carries its source: a datasheet (named, with its URL) or a measurement
(``measured <date> on <cpu>``). Numbers we could not find a primary source for are marked
``ASSUMPTION`` in ``sources`` and say what they assume; never tuned to reproduce a paper's results.

Units: bandwidths in GB/s (10^9 bytes per second), compute in FLOP/s, memory in GiB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

GB = 1e9
TERA = 1e12

# Datasheets (the names the sources below cite).
T4_DATASHEET = "NVIDIA T4 datasheet (nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf)"
A10_DATASHEET = "NVIDIA A10 datasheet (nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf)"
H100_DATASHEET = "NVIDIA H100 datasheet (resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet), dense (no sparsity) figures"
PCIE3 = "PCI-SIG: PCIe 3.0 x16 = 8 GT/s x 16 lanes x 128b/130b = 15.75 GB/s per direction"
PCIE4 = "PCI-SIG: PCIe 4.0 x16 = 16 GT/s x 16 lanes x 128b/130b = 31.5 GB/s per direction"
PCIE5 = "PCI-SIG: PCIe 5.0 x16 = 32 GT/s x 16 lanes x 128b/130b = 63 GB/s per direction"
G4DN = "AWS EC2 G4 instances page (aws.amazon.com/ec2/instance-types/g4/): g4dn.4xlarge = 1 T4, 16 vCPU (8 cores) Xeon Platinum P-8259CL (Cascade Lake), 64 GiB"
G5 = "AWS EC2 G5 instances page (aws.amazon.com/ec2/instance-types/g5/): g5.{2,4,8,16}xlarge = 1 A10G, 8/16/32/64 vCPU AMD EPYC 7R32 (2 vCPU per core)"


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator plus the host CPU that runs the CPU-side attention.

    ``peak_fp16_flops`` is the dense tensor-core figure; ``pcie_gbps`` is the theoretical
    per-direction figure of the host link (the roofline model applies its own efficiency).
    ``cpu_cores`` counts physical cores available to the CPU-attention worker; ``dram_gbps`` is
    the host DRAM read bandwidth those cores can reach.
    """

    name: str
    memory_bandwidth_gbps: float  # device memory, GB/s
    peak_fp16_flops: float  # FLOP/s, dense
    peak_fp32_flops: float  # FLOP/s
    memory_gib: float
    pcie_gbps: float  # per direction, GB/s
    cpu_name: str
    cpu_cores: int
    dram_gbps: float  # host DRAM read bandwidth reachable by cpu_cores, GB/s
    source: str  # one line: where the numbers come from
    sources: tuple[tuple[str, str], ...] = field(default=())  # field name -> its source

    def __post_init__(self) -> None:
        for name in ("memory_bandwidth_gbps", "peak_fp16_flops", "peak_fp32_flops", "memory_gib", "pcie_gbps",
                     "dram_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HardwareSpec {self.name!r}: {name} must be > 0, got {getattr(self, name)}")
        if self.cpu_cores < 1:
            raise ValueError(f"HardwareSpec {self.name!r}: cpu_cores must be >= 1, got {self.cpu_cores}")

    def source_of(self, field_name: str) -> str:
        return dict(self.sources).get(field_name, self.source)

    def peak_flops(self, dtype: str) -> float:
        return self.peak_fp32_flops if dtype == "float32" else self.peak_fp16_flops

    @classmethod
    def from_dict(cls, data: dict, where: str = "hardware") -> HardwareSpec:
        """The inverse of :meth:`to_dict`; a missing or malformed field raises ValueError naming it."""
        names = [k for k in cls.__dataclass_fields__ if k != "sources"]
        missing = [k for k in names if k not in data]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        values = {}
        for name in names:
            kind = cls.__dataclass_fields__[name].type
            try:
                values[name] = int(data[name]) if kind == "int" else float(data[name]) if kind == "float" \
                    else str(data[name])
            except (TypeError, ValueError):
                raise ValueError(f"{where}.{name}: expected a {kind}, got {data[name]!r}") from None
        sources = data.get("sources", {})
        if not isinstance(sources, dict):
            raise ValueError(f"{where}.sources: expected an object of field -> source, got {sources!r}")
        return cls(**values, sources=tuple((str(k), str(v)) for k, v in sources.items()))

    def to_dict(self) -> dict:
        result = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "sources"}
        result["sources"] = dict(self.sources)
        return result


# --- host CPUs (DRAM bandwidths flagged where assumed) -------------------------------------------
# Xeon Platinum 8259CL: Cascade Lake-SP, 6 channels DDR4-2933 per socket = 140.8 GB/s theoretical.
# AWS does not publish the share of it a g4dn.4xlarge VM (8 of the socket's 24 cores) can reach.
_G4DN_DRAM_GBPS = 60.0
_G4DN_DRAM_SOURCE = ("ASSUMPTION: 60 GB/s read for 8 Cascade Lake cores (~7.5 GB/s per core single-thread "
                     "stream read, typical of Cascade Lake-SP; socket ceiling 6 x DDR4-2933 = 140.8 GB/s, "
                     "Intel ark 8259CL-class parts). Not measured; replace with a measurement on a g4dn.4xlarge.")
# EPYC 7R32: Rome-class, 48 cores, 8 channels DDR4-3200 = 204.8 GB/s per socket theoretical.
_ROME_SOCKET_GBPS = 204.8
_ROME_PER_CORE_GBPS = 10.0


def _g5_dram_gbps(cores: int) -> float:
    """ASSUMPTION: ~10 GB/s per Rome core up to 70% of the socket's 204.8 GB/s."""
    return min(cores * _ROME_PER_CORE_GBPS, 0.7 * _ROME_SOCKET_GBPS)


_G5_DRAM_SOURCE = ("ASSUMPTION: min(10 GB/s x cores, 0.7 x 204.8 GB/s) for EPYC 7R32 (Rome, 8 x DDR4-3200 per "
                   "socket = 204.8 GB/s theoretical; per-core and 70%-of-peak figures are typical STREAM "
                   "results for Rome, not measured on g5). Replace with a measurement on the instance.")

T4_G4DN_4XLARGE = HardwareSpec(
    name="T4 (g4dn.4xlarge)",
    memory_bandwidth_gbps=320.0, peak_fp16_flops=65 * TERA, peak_fp32_flops=8.1 * TERA, memory_gib=15.0,
    pcie_gbps=15.75, cpu_name="Intel Xeon Platinum P-8259CL (8 cores / 16 vCPU)", cpu_cores=8,
    dram_gbps=_G4DN_DRAM_GBPS,
    source=f"{T4_DATASHEET}; {PCIE3}; {G4DN}; DRAM: assumed (see sources)",
    sources=(("memory_bandwidth_gbps", T4_DATASHEET), ("peak_fp16_flops", T4_DATASHEET),
             ("peak_fp32_flops", T4_DATASHEET), ("memory_gib", T4_DATASHEET + ": 16 GB GDDR6 = 14.9 GiB, ~15"),
             ("pcie_gbps", PCIE3), ("cpu_name", G4DN), ("cpu_cores", G4DN), ("dram_gbps", _G4DN_DRAM_SOURCE)),
)


def a10g_g5(vcpus: int) -> HardwareSpec:
    """A10G on a g5 instance with ``vcpus`` vCPUs (8, 16, 32 or 64) of EPYC 7R32."""
    if vcpus not in (8, 16, 32, 64):
        raise ValueError(f"g5 instances in NEO's setting have 8, 16, 32 or 64 vCPUs, got {vcpus}")
    cores = vcpus // 2
    a10g_note = (A10_DATASHEET + " (A10 figures; the A10G is AWS's variant with the same 24 GB / 600 GB/s "
                 "memory; ASSUMPTION: its tensor throughput is taken equal to the A10's)")
    return HardwareSpec(
        name=f"A10G (g5, {vcpus} vCPU)",
        memory_bandwidth_gbps=600.0, peak_fp16_flops=125 * TERA, peak_fp32_flops=31.2 * TERA, memory_gib=22.0,
        pcie_gbps=31.5, cpu_name=f"AMD EPYC 7R32 ({cores} cores / {vcpus} vCPU)", cpu_cores=cores,
        dram_gbps=_g5_dram_gbps(cores),
        source=f"{a10g_note}; {PCIE4}; {G5}; DRAM: assumed (see sources)",
        sources=(("memory_bandwidth_gbps", A10_DATASHEET), ("peak_fp16_flops", a10g_note),
                 ("peak_fp32_flops", a10g_note), ("memory_gib", A10_DATASHEET + ": 24 GB GDDR6 = 22.4 GiB"),
                 ("pcie_gbps", PCIE4), ("cpu_name", G5), ("cpu_cores", G5), ("dram_gbps", _G5_DRAM_SOURCE)),
    )


A10_G5_2XLARGE = a10g_g5(8)
A10_G5_4XLARGE = a10g_g5(16)
A10_G5_8XLARGE = a10g_g5(32)
A10_G5_16XLARGE = a10g_g5(64)

_SERVER_HOST = ("ASSUMPTION: a 32-core server socket with 200 GB/s DRAM read (a typical 8-channel DDR5 "
                "host share); H100 hosts vary, replace with a measurement")
H100_PCIE = HardwareSpec(
    name="H100 PCIe",
    memory_bandwidth_gbps=2000.0, peak_fp16_flops=756 * TERA, peak_fp32_flops=51 * TERA, memory_gib=74.5,
    pcie_gbps=63.0, cpu_name="server host (assumed)", cpu_cores=32, dram_gbps=200.0,
    source=f"{H100_DATASHEET}; {PCIE5}; host: assumed",
    sources=(("memory_bandwidth_gbps", H100_DATASHEET), ("peak_fp16_flops", H100_DATASHEET),
             ("peak_fp32_flops", H100_DATASHEET), ("memory_gib", H100_DATASHEET + ": 80 GB = 74.5 GiB"),
             ("pcie_gbps", PCIE5), ("cpu_cores", _SERVER_HOST), ("dram_gbps", _SERVER_HOST)),
)
H100_SXM = HardwareSpec(
    name="H100 SXM",
    memory_bandwidth_gbps=3350.0, peak_fp16_flops=989 * TERA, peak_fp32_flops=67 * TERA, memory_gib=74.5,
    pcie_gbps=63.0, cpu_name="server host (assumed)", cpu_cores=32, dram_gbps=200.0,
    source=f"{H100_DATASHEET}; host link {PCIE5}; host: assumed",
    sources=(("memory_bandwidth_gbps", H100_DATASHEET), ("peak_fp16_flops", H100_DATASHEET),
             ("peak_fp32_flops", H100_DATASHEET), ("memory_gib", H100_DATASHEET + ": 80 GB = 74.5 GiB"),
             ("pcie_gbps", PCIE5), ("cpu_cores", _SERVER_HOST), ("dram_gbps", _SERVER_HOST)),
)

HARDWARE: dict[str, HardwareSpec] = {
    "t4": T4_G4DN_4XLARGE,
    "a10g-8vcpu": A10_G5_2XLARGE,
    "a10g-16vcpu": A10_G5_4XLARGE,
    "a10g-32vcpu": A10_G5_8XLARGE,
    "a10g-64vcpu": A10_G5_16XLARGE,
    "h100-pcie": H100_PCIE,
    "h100-sxm": H100_SXM,
}


def get_hardware(name: str) -> HardwareSpec:
    """A datasheet entry by key (``t4``, ``a10g-<n>vcpu``, ``h100-pcie``, ``h100-sxm``), or ``this-machine``."""
    if name == "this-machine":
        raise ValueError("'this-machine' is measured, not a datasheet entry: the engine measures it "
                         "(apexlib.runner.machine.this_machine); pass cost_model='roofline:this-machine' to it")
    try:
        return HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; choose from {sorted(HARDWARE) + ['this-machine']}") from None
