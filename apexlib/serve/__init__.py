"""``apex serve``: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

- :mod:`apexlib.serve.loop`: the background thread that owns the engine;
- :mod:`apexlib.serve.protocol`: request parsing and OpenAI-style errors;
- :mod:`apexlib.serve.detok`: incremental detokenization and stop strings;
- :mod:`apexlib.serve.app`: the FastAPI application; :mod:`apexlib.serve.server`: running it.
"""
