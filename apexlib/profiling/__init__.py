"""Profiling: measuring this machine's subtask times through the real engine (``profiler``), the
calibration of the overlapped modes (``calibrate``) and a profile's accuracy (``accuracy``). Needs
torch; the cost models it produces live in :mod:`apexlib.costs` (torch-free)."""
