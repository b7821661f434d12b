"""Which device a stage computes on, and how to say so in one line.

``train.accelerator`` follows Lightning's names (``auto``, ``cpu``, ``gpu``, ``cuda``,
``mps``); ``auto`` takes a CUDA GPU when there is one, then Apple's MPS, else the CPU, as
Lightning does. Evaluate and register score on the device train used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a device is asked for, not with this module
    import torch


def resolve(accelerator: str = "auto") -> torch.device:
    """The torch device ``accelerator`` stands for on this machine."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    mps = getattr(torch.backends, "mps", None)
    if accelerator == "mps" or (accelerator == "auto" and mps is not None and mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


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
