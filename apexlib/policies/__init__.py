"""Placement and overlap policies. Torch-free; each is looked up by name in ``POLICY_REGISTRY``."""

from __future__ import annotations

from typing import Any

from apexlib.core.config import SchedulerConfig
from apexlib.costs import CostModel
from apexlib.policies.base import Policy
from apexlib.policies.gpu_only import GpuOnlyPolicy
from apexlib.policies.hybrid import HybridPolicy
from apexlib.policies.profiled import ApexPolicy, NeoPolicy, NeoPublishedPolicy

POLICY_REGISTRY: dict[str, type[Policy]] = {
    GpuOnlyPolicy.name: GpuOnlyPolicy, HybridPolicy.name: HybridPolicy, NeoPolicy.name: NeoPolicy,
    NeoPublishedPolicy.name: NeoPublishedPolicy, ApexPolicy.name: ApexPolicy,
}
PROFILED_POLICIES = (NeoPolicy.name, NeoPublishedPolicy.name, ApexPolicy.name)


def make_policy(name: str, **options: Any) -> Policy:
    """Build a policy by name; ``options`` are its constructor's keyword arguments."""
    try:
        policy_class = POLICY_REGISTRY[name]
    except KeyError:
        raise ValueError(f"policy must be one of {sorted(POLICY_REGISTRY)}, got {name!r}") from None
    return policy_class(**options)


def policy_from_config(config: SchedulerConfig, cost_model: CostModel | None = None,
                       transfer_bytes_per_cpu_token: int = 0, transfer_to_cpu_fraction: float = 0.75,
                       **options: Any) -> Policy:
    """The policy a scheduler config names, with its options; ``options`` are extra constructor keywords
    (e.g. apex's ``enable_pipeline``). The profiled policies need a cost model and the per-token copy
    volume of a CPU-resident decode (q/k/v out, attention output back; 0 when the device is the CPU)."""
    if config.policy == HybridPolicy.name:
        return HybridPolicy(**{"mode": config.hybrid_mode, "placement": config.cpu_placement, **options})
    if config.policy in PROFILED_POLICIES:
        if cost_model is None:
            raise ValueError(f"policy {config.policy!r} needs a cost model (a profile from `apex profile`)")
        kwargs = {"transfer_bytes_per_cpu_token": transfer_bytes_per_cpu_token,
                  "transfer_to_cpu_fraction": transfer_to_cpu_fraction, **options}
        if config.policy == ApexPolicy.name:
            kwargs.setdefault("iteration_time_bound", config.iteration_time_bound)
        return POLICY_REGISTRY[config.policy](cost_model, **kwargs)
    return make_policy(config.policy, **options)


__all__ = ["POLICY_REGISTRY", "PROFILED_POLICIES", "ApexPolicy", "GpuOnlyPolicy", "HybridPolicy", "NeoPolicy", "NeoPublishedPolicy",
           "Policy", "make_policy", "policy_from_config"]
