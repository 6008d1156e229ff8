"""Build and cache apexlib's CPU kernels (one torch C++ extension).

The extension is compiled once per (sources, torch version, Python ABI, compiler, flags) with
``torch.utils.cpp_extension.load`` into ``$APEX_KERNEL_CACHE/<hash>`` (default
``~/.cache/apexlib/kernels/<hash>``, honouring ``$XDG_CACHE_HOME``). The hash covers the contents of
every ``*.cpp`` / ``*.h`` file in this folder, so an unchanged source is never recompiled: when the
shared object for the hash already exists it is imported directly without invoking the compiler or
ninja. Concurrent first builds are serialised by torch's file lock in the build directory.

Flags: ``-O3 -fopenmp`` and no ``-march``: the AVX2 and AVX-512 code paths are compiled with target
pragmas inside the sources and chosen at run time from CPUID, so the same build runs on any x86-64.
``APEX_KERNEL_EXTRA_CFLAGS`` appends flags (part of the hash; meant for experiments).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ["bindings.cpp", "cpu_runtime.cpp", "paged_decode_attention.cpp", "store_kv.cpp", "read_bandwidth.cpp",
           "arith_stream.cpp"]
BASE_CFLAGS = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
BASE_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None


def cache_root() -> Path:
    """Folder holding one build directory per hash."""
    env = os.environ.get("APEX_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "apexlib" / "kernels"


def _cflags() -> list[str]:
    return BASE_CFLAGS + os.environ.get("APEX_KERNEL_EXTRA_CFLAGS", "").split()


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compiler_path() -> str:
    """Resolve the compiler torch will call, or raise a RuntimeError naming it."""
    cxx = _compiler()
    path = shutil.which(cxx)
    if path is None:
        others = [c for c in ("c++", "g++", "clang++") if c != cxx and shutil.which(c)]
        hint = f" ({', '.join(others)} found: set CXX to one of them)" if others else " (install g++)"
        raise RuntimeError(
            f"apexlib's CPU attention kernels need a C++ compiler, but '{cxx}' (from $CXX or the default 'c++') "
            f"was not found on PATH{hint}; APEX_CPU_ATTENTION=torch selects the slow plain-torch reference instead"
        )
    return path


def _compiler_version(path: str) -> str:
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def source_hash(compiler_id: str = "") -> str:
    import torch

    h = hashlib.sha256()
    for f in sorted(KERNEL_DIR.glob("*.cpp")) + sorted(KERNEL_DIR.glob("*.h")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(str(sysconfig.get_config_var("EXT_SUFFIX")).encode())
    h.update(" ".join(_cflags() + BASE_LDFLAGS).encode())
    h.update(compiler_id.encode())
    return h.hexdigest()[:16]


def _import_so(name: str, so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {so}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load() -> ModuleType:
    """Return the compiled extension module, building it on first use."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        import torch  # noqa: F401  (the extension links against libtorch: load it first)

        cxx = _compiler()
        # Cheap key first (no compiler call): the compiler's name. A build for a different
        # compiler version lands in a different folder because its `--version` text is hashed too.
        path = shutil.which(cxx)
        key = source_hash(f"{cxx}|{path}|{_compiler_version(path) if path else ''}")
        name = f"apexlib_cpu_{key}"
        build_dir = cache_root() / key
        so = build_dir / f"{name}.so"
        if so.exists():
            _module = _import_so(name, so)
            log.debug("loaded cached CPU kernels from %s", so)
            return _module
        _compiler_path()  # raises a RuntimeError naming the missing compiler
        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        log.info("compiling apexlib CPU kernels into %s (first use; ~30-60 s)", build_dir)
        t0 = time.perf_counter()
        _module = cpp_extension.load(
            name=name,
            sources=[str(KERNEL_DIR / s) for s in SOURCES],
            extra_cflags=_cflags(),
            extra_ldflags=BASE_LDFLAGS,
            extra_include_paths=[str(KERNEL_DIR)],
            build_directory=str(build_dir),
            verbose=False,
        )
        log.info("compiled apexlib CPU kernels in %.1f s", time.perf_counter() - t0)
        return _module
