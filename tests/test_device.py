"""Which device a stage uses for `train.accelerator`, checked without a GPU."""

from __future__ import annotations

import pytest
import torch

from pipeline import device
from pipeline.io import StageError


def test_accelerator_names_map_to_devices():
    assert device.resolve("cuda") == torch.device("cuda", 0)
    assert device.resolve("gpu") == torch.device("cuda", 0)
    assert device.resolve("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert device.resolve("auto") == expected
    assert device.available("auto") == expected and device.available("cpu") == torch.device("cpu")


def test_a_device_this_machine_lacks_is_one_line_naming_the_key():
    if not torch.backends.mps.is_available():  # never on Linux: a params.yaml from a Mac
        with pytest.raises(StageError) as error:
            device.available("mps")
        assert str(error.value) == (
            "params.yaml: train.accelerator: 'mps' needs an MPS device, and this machine has "
            "none (torch.backends.mps.is_available() is False); use auto (a GPU where there is "
            "one, else the CPU) or cpu"
        )
    for name in ("cuda", "gpu"):
        if torch.cuda.is_available():
            assert device.available(name, key="--accelerator") == torch.device("cuda", 0)
            continue
        with pytest.raises(StageError) as error:  # a params.yaml from a GPU host
            device.available(name, key="--accelerator")
        assert str(error.value) == (
            f"--accelerator: '{name}' needs a CUDA GPU, and this machine has none "
            "(torch.cuda.is_available() is False); use auto (a GPU where there is one, "
            "else the CPU) or cpu"
        )


def test_cpu_is_described_with_its_threads():
    assert device.describe("cpu") == f"cpu ({torch.get_num_threads()} threads)"


def test_predict_sends_batches_to_the_device_and_returns_host_labels():
    from pipeline.stages.evaluate import predict

    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append((x.device.type, x.dtype))
            return torch.stack([x.sum(dim=1), -x.sum(dim=1)], dim=1)

    x = torch.tensor([[1, 2], [-3, 1], [0, 5]], dtype=torch.int64)
    labels = predict(Spy(), x, batch_size=2, device=torch.device("cpu"))
    assert labels.tolist() == [0, 1, 0] and seen == [("cpu", torch.float32)] * 2
