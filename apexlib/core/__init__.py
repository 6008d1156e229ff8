"""The contracts that cross planes (config, request, plan, stats, clock, metrics, results, model shapes).

Nothing here imports anything of apexlib above it, nor torch.
"""
