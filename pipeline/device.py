"""Which device a stage computes on, and how to say so in one line.

``train.accelerator`` follows Lightning's names (``auto``, ``cpu``, ``gpu``, ``cuda``,
``mps``); ``auto`` takes a CUDA GPU when there is one, then Apple's MPS, else the CPU, as
Lightning does. Evaluate and register score on the device train used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.io import StageError

if TYPE_CHECKING:  # torch is imported when a device is asked for, not with this module
    import torch


def resolve(accelerator: str = "auto") -> torch.device:
    """The torch device ``accelerator`` stands for (whether or not this machine has it:
    see :func:`available`)."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    if accelerator == "mps" or (accelerator == "auto" and has_mps()):
        return torch.device("mps")
    return torch.device("cpu")


def available(
    accelerator: str = "auto", key: str = "params.yaml: train.accelerator"
) -> torch.device:
    """:func:`resolve`, on a machine that has the device: one named outright (``cuda``,
    ``gpu``, ``mps``) that this machine lacks is a :class:`StageError` naming ``key`` (where
    the value came from), so that a params.yaml written on a GPU host stops in one line on a
    CPU-only one, before anything is trained or written."""
    import torch

    device = resolve(accelerator)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StageError(missing(key, accelerator, "a CUDA GPU", "torch.cuda.is_available()"))
    if device.type == "mps" and not has_mps():
        raise StageError(
            missing(key, accelerator, "an MPS device", "torch.backends.mps.is_available()")
        )
    return device


def has_mps() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def missing(key: str, accelerator: str, device: str, check: str) -> str:
    """The line for a device asked for by ``key`` that this machine lacks."""
    return (
        f"{key}: {accelerator!r} needs {device}, and this machine has none ({check} is "
        "False); use auto (a GPU where there is one, else the CPU) or cpu"
    )


def describe(device: torch.device | str) -> str:
    """``cuda:0 NVIDIA H100 80GB HBM3``, ``mps``, or ``cpu (2 threads)``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
