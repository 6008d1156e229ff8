"""The engine clock: every time in requests, outputs and metrics is ``clock()`` seconds."""

import time

clock = time.perf_counter
