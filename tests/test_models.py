"""The networks: any input shape, transfer learning with a frozen backbone, MLP, augmentation."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from pipeline.config import ModelParams, TrainParams
from pipeline.data.loader import Prepared
from pipeline.data.table import Manifest, make_table
from pipeline.io import StageError
from pipeline.models import build_net, model_spec
from pipeline.models.augment import augment, random_crop, random_flip
from pipeline.models.resnet import ResNet18, WeightsError
from pipeline.training import build_module, fit
from tests.formats import digits_images


def prepared_images(n: int, shape: list[int], classes: int = 3) -> Prepared:
    """A small image data set (digits resized), split 2:1 into train and val."""
    images, labels = digits_images(n, shape[1], channels=shape[0], classes=classes)
    table = make_table(images.reshape(n, -1), labels)
    manifest = Manifest(
        "test", n, "sha256:x", list(range(classes)), shape, [0.0, 255.0], dtype="uint8"
    )
    from pipeline.data.loader import to_tensors

    cut = 2 * n // 3
    tables = {
        "train": table[:cut].reset_index(drop=True),
        "val": table[cut:].reset_index(drop=True),
    }
    return Prepared(manifest, tables, {s: to_tensors(t, shape) for s, t in tables.items()})


@pytest.mark.parametrize("name", ["cnn", "resnet18", "mlp"])
@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 28, 28], [3, 32, 32]])
def test_every_image_model_takes_raw_pixels_of_any_size(name, shape):
    manifest = Manifest("t", 0, "x", list(range(10)), shape, [0.0, 255.0])
    net = build_net(model_spec(name, manifest, channels=8, dropout=0.1)).eval()
    for dtype in (torch.float32, torch.uint8):
        out = net(torch.full((2, *shape), 255).to(dtype))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    if name == "resnet18":  # small inputs get the CIFAR-style stem, larger keep ImageNet's
        assert net.small_stem == (shape[1] < 32)
        assert net.backbone.conv1.kernel_size == ((3, 3) if shape[1] < 32 else (7, 7))


def test_image_models_refuse_tabular_data():
    manifest = Manifest("csv", 10, "x", [0, 1], [4], None)
    data = Prepared(manifest, {}, {"train": (torch.zeros(6, 4), torch.zeros(6).long())})
    with pytest.raises(
        StageError, match="model.name: model 'cnn' needs images.*use model.name: mlp"
    ):
        build_module(TrainParams(), ModelParams(name="cnn"), data)
    with pytest.raises(StageError, match="train.augment: \\['crop'\\] applies to images"):
        build_module(TrainParams(augment=["crop"]), ModelParams(name="mlp"), data)


def test_mlp_standardises_tabular_features_with_training_statistics():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal([100.0, -5.0, 0.0], [10.0, 0.1, 1.0], size=(400, 3)))
    x = x.float()
    y = (x[:, 0] > 100).long()
    manifest = Manifest("csv", 400, "x", [0, 1], [3], None)
    data = Prepared(manifest, {}, {"train": (x, y)})
    module = build_module(TrainParams(), ModelParams(name="mlp"), data)
    scale = module.net[1]
    assert torch.allclose(scale.low, x.mean(0), atol=1e-4)
    assert torch.allclose(scale.span, x.std(0), rtol=1e-3)
    assert scale(x).mean(0).abs().max() < 1e-4  # standardised on the way in
    # The statistics are buffers: saved with the weights and restored by build_net.
    rebuilt = build_net(model_spec("mlp", manifest, 32, 0.2))
    rebuilt.load_state_dict(module.net.state_dict())
    assert torch.equal(rebuilt[1].low, scale.low)


def _save_torchvision_weights(path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    state = resnet18(num_classes=1000).state_dict()
    torch.save(state, path)
    return state


class Snapshot(pl.Callback):
    """The network's state as training starts (after pretrained weights were loaded)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}


def _backbone_fit(shape, tmp_path, freeze: bool):
    weights = tmp_path / "resnet18.pth"
    saved = _save_torchvision_weights(weights)
    data = prepared_images(60, shape)
    model = ModelParams(name="resnet18", weights_path=str(weights), freeze_backbone=freeze)
    hp = TrainParams(max_epochs=2, batch_size=20, lr=0.01, accelerator="cpu")
    start = Snapshot()
    module, _ = fit(hp, model, data, [start])
    return saved, start.state, module.net


@pytest.mark.slow  # trains a model for several seconds
@pytest.mark.parametrize("shape", [[3, 32, 32], [1, 8, 8]])
def test_transfer_learning_trains_only_the_head_when_frozen(tmp_path, shape):
    saved, before, net = _backbone_fit(shape, tmp_path, freeze=True)
    after = net.state_dict()
    assert not torch.equal(after["head.1.weight"], before["head.1.weight"])  # the head learns
    fresh_stem = net.small_stem  # a 3×3 stem cannot take 7×7 kernels: trained, not frozen
    checked = 0
    for key, value in after.items():
        if not key.startswith("backbone.") or key.endswith("num_batches_tracked"):
            continue
        name = key.removeprefix("backbone.")
        if fresh_stem and name.startswith(("conv1.", "bn1.")):
            continue
        expected = saved[name]
        if name == "conv1.weight" and shape[0] == 1:
            expected = expected.sum(dim=1, keepdim=True)  # RGB kernels summed for grey input
        # Frozen weights and batch-norm statistics are exactly as loaded, before and after.
        assert torch.equal(before[key], expected), name
        assert torch.equal(value, expected), name
        checked += 1
    assert checked > 80  # every conv, batch-norm weight and statistic of the backbone
    if fresh_stem:
        assert not torch.equal(after["backbone.conv1.weight"], before["backbone.conv1.weight"])
    assert not any(p.requires_grad for p in net.backbone.layer4.parameters())


@pytest.mark.slow  # trains a model for several seconds
def test_unfrozen_transfer_learning_fine_tunes_the_backbone(tmp_path):
    saved, before, net = _backbone_fit([3, 32, 32], tmp_path, freeze=False)
    key = "layer4.1.conv2.weight"
    assert torch.equal(before[f"backbone.{key}"], saved[key])  # loaded ...
    assert not torch.equal(net.backbone.state_dict()[key], saved[key])  # ... then trained


def test_weights_files_that_cannot_be_used_are_named(tmp_path):
    net = ResNet18([3, 32, 32], 3, [0.0, 255.0])
    with pytest.raises(WeightsError, match="nope.pth: weights file not found"):
        net.load_backbone(tmp_path / "nope.pth")
    other = tmp_path / "cnn.pt"
    torch.save({"0.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(WeightsError, match="cnn.pt: not resnet18 weights"):
        net.load_backbone(other)
    wrong = tmp_path / "wide.pt"
    torch.save({"layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3)}, wrong)
    with pytest.raises(WeightsError, match="wide.pt: tensor shapes do not fit"):
        net.load_backbone(wrong)
    truncated = tmp_path / "truncated.pth"
    _save_torchvision_weights(truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="truncated.pth: cannot load as a weights-only"):
        net.load_backbone(truncated)


class _Payload:
    """Unpickling this runs os.system: a real code-execution payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_a_weights_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload(marker)}, evil)
    net = ResNet18([3, 32, 32], 3, [0.0, 255.0])
    with pytest.raises(WeightsError, match="evil.pth: cannot load as a weights-only"):
        net.load_backbone(evil)
    assert not marker.exists()


def test_our_own_resnet_model_pt_can_seed_transfer_learning(tmp_path):
    torch.manual_seed(0)
    first = ResNet18([1, 28, 28], 10, [0.0, 255.0])
    torch.save(first.state_dict(), tmp_path / "model.pt")
    second = ResNet18([1, 28, 28], 3, [0.0, 255.0])
    assert second.load_backbone(tmp_path / "model.pt") == []
    assert torch.equal(second.backbone.conv1.weight, first.backbone.conv1.weight)


def test_augmentation_is_random_per_image_and_keeps_shape_and_dtype():
    torch.manual_seed(0)
    x = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(256, 1, 1, 1)
    cropped = random_crop(x)
    assert cropped.shape == x.shape and cropped.dtype == torch.uint8
    distinct = {tuple(c.flatten().tolist()) for c in cropped}
    assert len(distinct) == 9  # one-pixel padding: 3 × 3 offsets, each drawn by some image
    flipped = random_flip(x)
    is_flipped = (flipped == x.flip(-1)).flatten(1).all(1)
    assert 0.3 < is_flipped.float().mean() < 0.7  # about half, chosen per image
    assert ((flipped == x).flatten(1).all(1) | is_flipped).all()
    both = augment(x.float(), ["crop", "flip"])
    assert both.shape == x.shape and both.dtype == torch.float32
    assert torch.equal(augment(x, []), x)


def test_augmented_training_sees_different_batches_and_still_learns(digits_prepared):
    hp = TrainParams(max_epochs=3, batch_size=64, accelerator="cpu")
    plain, _ = fit(hp, ModelParams(channels=8), digits_prepared, [])
    hp = hp.model_copy(update={"augment": ["crop"]})
    augmented, trainer = fit(hp, ModelParams(channels=8), digits_prepared, [])
    assert augmented.augment == ("crop",)
    weight = "1.weight"  # the first convolution: same seed, different inputs
    assert not torch.equal(plain.net.state_dict()[weight], augmented.net.state_dict()[weight])
    assert trainer.callback_metrics["val/acc"] > 0.3  # far above chance (0.1)


@pytest.mark.parametrize(
    ("shape", "macs", "pooled_early"),
    [
        ([1, 8, 8], 1_495_552, False),  # the digits: two layers at full resolution, as before
        ([1, 28, 28], 4_744_192, True),  # MNIST: 18.3 M before the early pool
        ([3, 32, 32], 6_785_536, True),  # CIFAR-10
    ],
)
def test_the_cnn_costs_what_its_input_size_affords(shape, macs, pooled_early):
    """Multiply-adds of one forward pass at the default 32 channels, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.cnn import build_cnn

    net = build_cnn(shape, 10, [0.0, 255.0]).eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, *shape))
    assert counter.get_total_flops() // 2 == macs
    second = net[4]  # after the first conv, batch norm and ReLU
    assert isinstance(second, torch.nn.MaxPool2d) is pooled_early


def test_a_model_of_another_layout_version_is_refused_by_name(tmp_path):
    import json

    from pipeline.models import ARCHITECTURE_VERSIONS
    from pipeline.stages.evaluate import load_model

    manifest = Manifest("t", 0, "x", list(range(10)), [1, 8, 8], [0.0, 16.0])
    spec = model_spec("cnn", manifest, channels=8, dropout=0.1)
    assert spec["architecture_version"] == ARCHITECTURE_VERSIONS["cnn"] == 2
    torch.save(build_net(spec).state_dict(), tmp_path / "model.pt")
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "model.json").write_text(json.dumps(spec))
    net, loaded = load_model(tmp_path)
    assert loaded == spec and not net.training

    # Written before model.json had a version: the cnn's first layout.
    del spec["architecture_version"]
    (tmp_path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(StageError) as error:
        load_model(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}/model.json: the model is a cnn of layout version 1, and this Runway builds "
        "version 2; retrain it (dvc repro train)"
    )


def test_loss_and_accuracy_matches_torchmetrics_mean_and_accuracy():
    """The training metrics' one-update sums give what MeanMetric (per-sample losses) and
    MulticlassAccuracy (micro) give, over batches of unequal size; two processes' sums
    merged (what a data-parallel compute does) give the same as one over all batches; a
    NaN loss makes the mean NaN; reset starts again."""
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    from pipeline.models.module import LossAndAccuracy

    generator = torch.Generator().manual_seed(0)
    batches = []
    for size in (64, 64, 13):
        logits = torch.randn(size, 10, generator=generator)
        target = torch.randint(0, 10, (size,), generator=generator)
        losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        batches.append((losses, logits, target))
    ours, first, second = LossAndAccuracy(), LossAndAccuracy(), LossAndAccuracy()
    mean, accuracy = MeanMetric(), MulticlassAccuracy(10, average="micro")
    for i, (losses, logits, target) in enumerate(batches):
        ours.update(losses, logits, target)
        (first if i < 2 else second).update(losses, logits, target)
        mean.update(losses)
        accuracy.update(logits, target)
    loss, acc = ours.compute()
    assert loss.item() == pytest.approx(mean.compute().item(), rel=1e-6)
    assert acc.item() == pytest.approx(accuracy.compute().item(), rel=1e-6)
    correct = sum((logits.argmax(1) == target).sum().item() for _, logits, target in batches)
    assert acc.item() == pytest.approx(correct / 141)
    first.merge_state(second)
    assert [t.item() for t in first.compute()] == pytest.approx([loss.item(), acc.item()])
    ours.reset()
    assert not ours.update_called
    ours.update(torch.tensor([1.0, float("nan")]), torch.eye(2), torch.tensor([0, 0]))
    loss, acc = ours.compute()
    assert torch.isnan(loss) and acc.item() == 0.5
