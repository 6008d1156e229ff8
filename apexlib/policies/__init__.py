"""Placement and overlap policies (torch-free), looked up by name in :mod:`apexlib.policies.registry`."""

from __future__ import annotations

from apexlib.policies.base import Policy
from apexlib.policies.gpu_only import GpuOnlyPolicy
from apexlib.policies.hybrid import HybridPolicy
from apexlib.policies.options import ApexOptions, HybridOptions, NoOptions, PolicyOptions
from apexlib.policies.profiled import ApexPolicy, NeoPolicy, NeoPublishedPolicy
from apexlib.policies.registry import (
    POLICIES,
    POLICY_NAMES,
    PROFILED_POLICIES,
    PolicySpec,
    build_policy,
    option_names,
    policy_options,
    policy_spec,
)
from apexlib.policies.vllm_offload import VllmOffloadPolicy

__all__ = [
    "POLICIES", "POLICY_NAMES", "PROFILED_POLICIES", "ApexOptions", "ApexPolicy", "GpuOnlyPolicy", "HybridOptions",
    "HybridPolicy", "NeoPolicy", "NeoPublishedPolicy", "NoOptions", "Policy", "PolicyOptions", "PolicySpec",
    "VllmOffloadPolicy", "build_policy", "option_names", "policy_options", "policy_spec",
]
