"""Which device a stage uses for `train.accelerator`, checked without a GPU."""

from __future__ import annotations

import torch

from pipeline import device


def test_accelerator_names_map_to_devices():
    assert device.resolve("cuda") == torch.device("cuda", 0)
    assert device.resolve("gpu") == torch.device("cuda", 0)
    assert device.resolve("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert device.resolve("auto") == expected


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
