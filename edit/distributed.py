"""Several processes under ``accelerate launch``: thin wrappers of accelerate for this library.

    accelerate launch --num_processes 2 -m edit forget --corpus private.jsonl
    accelerate launch --config_file fsdp.yaml -m edit learn --corpus new.jsonl
    accelerate launch --cpu --num_processes 2 -m edit add "Paris is capital of Italy" \\
        --stats-corpus big.parquet

Everything collective is accelerate's: the trainer (``edit.methods.unlearn``) prepares its
model and optimizer with an :class:`accelerate.Accelerator` (DDP, FSDP or DeepSpeed as the
launch configuration says; gradient accumulation and mixed precision likewise) and the key
statistics (:mod:`edit.stats`) reduce their sums with it. What is left here is what accelerate
does not do for us: a one-line error when the launch configuration cannot be served on this
machine, and the main-process checks that the workspace uses to write the ledger once.

Without a launcher (``WORLD_SIZE`` unset or 1) there is one process, which is the main one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from edit.errors import EditError

if TYPE_CHECKING:
    from accelerate import Accelerator


def launched() -> bool:
    """Whether a launcher started several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_launch() -> None:
    """Raise :class:`EditError` (one line: what to install or change) when the launch
    configuration in the environment cannot run on this machine."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise EditError(
                "the launch configuration asks for DeepSpeed, which is not installed: "
                "pip install deepspeed, or launch with a DDP or FSDP configuration"
            )
    if not launched() or os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true":
        return
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count()
    if gpus and per_machine > gpus:
        raise EditError(
            f"launched {per_machine} processes on a machine with {gpus} GPU(s): pass "
            f"--num_processes {gpus} (or --cpu) to accelerate launch"
        )


def _cpu_only() -> bool:
    """Whether the processes run on CPUs: ``accelerate launch --cpu``, or no GPU here (then a
    launcher such as torchrun gets gloo on the CPU, where accelerate would run one process)."""
    return os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true" or not (
        torch.cuda.is_available()
    )


def _state():
    from accelerate import PartialState

    return PartialState(cpu=_cpu_only())


def init() -> torch.device:
    """Join the process group the launcher describes (accelerate picks the backend: NCCL on
    GPUs, gloo on CPUs) and return this process's device."""
    check_launch()
    return _state().device


def accelerator(**kwargs) -> Accelerator:
    """An :class:`accelerate.Accelerator` configured by the launcher's environment (strategy,
    mixed precision, gradient accumulation). The caller places the model itself
    (``device_placement=False``): a model loaded with a device map stays where it is."""
    check_launch()
    from accelerate import Accelerator

    try:
        return Accelerator(device_placement=False, cpu=_cpu_only(), **kwargs)
    except (ImportError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EditError(f"accelerate cannot serve this launch configuration: {first}") from None


def rank_and_size() -> tuple[int, int]:
    """(this process's index, number of processes)."""
    if not launched():
        return 0, 1
    state = _state()
    return state.process_index, state.num_processes


def is_main() -> bool:
    """Whether this is the main process (the one that writes files)."""
    if not launched():
        return True
    return _state().is_main_process


def wait_for_everyone() -> None:
    """Block until every process reaches this point (accelerate's barrier)."""
    if launched():
        _state().wait_for_everyone()


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over the processes (accelerate's reduce)."""
    if not launched():
        return tensor
    from accelerate.utils import reduce

    _state()
    return reduce(tensor, reduction="sum")
