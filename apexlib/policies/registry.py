"""The one policy registry: a name -> its class and its own frozen options dataclass.

Every place that takes a policy (``EngineArgs``, ``simulate``, the CLI's ``--policy`` and
``--policy-option``, the notebooks) resolves it here, so the names and their options are defined
once and validated once: :func:`policy_options` turns a mapping (or an options object) into the
policy's options dataclass and names an unknown option with the options the policy has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from apexlib.costs.base import CostModel
from apexlib.policies.base import Policy
from apexlib.policies.gpu_only import GpuOnlyPolicy
from apexlib.policies.hybrid import HybridPolicy
from apexlib.policies.options import ApexOptions, HybridOptions, NoOptions, PolicyOptions
from apexlib.policies.profiled import ApexPolicy, NeoPolicy, NeoPublishedPolicy
from apexlib.policies.vllm_offload import VllmOffloadPolicy


@dataclass(frozen=True)
class PolicySpec:
    """Every fact about a policy that code outside ``policies/`` reads: its class and options type,
    whether it predicts with a cost model, whether it keeps KV in the CPU tier and whether it runs
    attention there, its figure label and its help line."""

    name: str
    policy_class: type[Policy]
    options_class: type
    needs_cost_model: bool
    #: keeps requests' KV in the CPU tier (the engine sizes one by default)
    uses_cpu_tier: bool
    #: decodes CPU-resident requests with CPU attention (a request may then live wholly in the CPU tier);
    #: without it a request must fit the GPU tier to run
    cpu_attention: bool
    label: str
    help: str


POLICIES: dict[str, PolicySpec] = {spec.name: spec for spec in (
    PolicySpec("gpu_only", GpuOnlyPolicy, NoOptions, False, False, False, "GPU-only (vLLM-like)",
               "the vLLM-like baseline: everything on the GPU, preempt and recompute"),
    PolicySpec("vllm_offload", VllmOffloadPolicy, NoOptions, False, True, False, "vLLM + CPU KV offload",
               "GPU-only with vLLM's CPU KV offloading: a preempted request's KV waits in the CPU tier"),
    PolicySpec("hybrid", HybridPolicy, HybridOptions, False, True, True, "fixed hybrid",
               "a fixed execution mode (hybrid_mode) with overflow or all-CPU placement, no cost model"),
    PolicySpec("neo", NeoPolicy, NoOptions, True, True, True, "NEO policy on apexlib's runtime",
               "NEO's scheduler on apexlib's two-thread runtime"),
    PolicySpec("neo_published", NeoPublishedPolicy, NoOptions, True, True, True, "NEO (published runtime)",
               "NEO as its public code runs: CPU attention blocks the launching thread"),
    PolicySpec("apex", ApexPolicy, ApexOptions, True, True, True, "APEX (async overlap + pipelining)",
               "APEX: asynchronous overlap without splitting the batch, NEO's pipeline where it pays"),
)}
POLICY_NAMES = tuple(POLICIES)
PROFILED_POLICIES = tuple(name for name, spec in POLICIES.items() if spec.needs_cost_model)


def policy_spec(name: str) -> PolicySpec:
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"policy must be one of {list(POLICY_NAMES)}, got {name!r}") from None


def option_names(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(policy_spec(name).options_class))


def policy_options(name: str, options: Mapping[str, Any] | PolicyOptions | None = None) -> PolicyOptions:
    """The validated options of policy ``name``: its options dataclass from a mapping (or as given)."""
    spec = policy_spec(name)
    if options is None:
        return spec.options_class()
    if isinstance(options, spec.options_class):
        return options
    if dataclasses.is_dataclass(options):
        raise TypeError(f"policy {name!r} takes {spec.options_class.__name__}, got {type(options).__name__}")
    if not isinstance(options, Mapping):
        raise TypeError(f"policy_options must be a mapping of option name -> value, got {type(options).__name__}")
    known = option_names(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {unknown}; its options: {list(known) or 'none'}")
    return spec.options_class(**options)


def build_policy(name: str, options: Mapping[str, Any] | PolicyOptions | None = None,
                 cost_model: CostModel | None = None, transfer_bytes_per_cpu_token: int = 0,
                 transfer_to_cpu_fraction: float = 0.75) -> Policy:
    """The policy ``name`` with its options. The profiled policies need a cost model and the per-token
    copy volume of a CPU-resident decode (q/k/v out, attention output back; 0 when the device is the CPU)."""
    spec = policy_spec(name)
    kwargs = dataclasses.asdict(policy_options(name, options))
    if not spec.needs_cost_model:
        return spec.policy_class(**kwargs)
    if cost_model is None:
        raise ValueError(f"policy {name!r} needs a cost model (a profile from `apex profile`, "
                         f"'roofline:<hardware>' or 'zero')")
    return spec.policy_class(cost_model, transfer_bytes_per_cpu_token=transfer_bytes_per_cpu_token,
                             transfer_to_cpu_fraction=transfer_to_cpu_fraction, **kwargs)
