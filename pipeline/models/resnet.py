"""torchvision's ResNet-18 for any image size and channel count, with optional transfer learning.

- Inputs smaller than 32×32 (8×8 digits, 28×28 MNIST) get a CIFAR-style stem: a 3×3 stride-1
  first convolution and no max-pool, so the feature map does not vanish before the last block.
  Larger inputs keep the ImageNet stem (7×7 stride 2, then max-pool).
- Pixels are scaled to [0, 1] and normalised with the ImageNet mean and standard deviation (the
  channel average for grey images), which is what pretrained weights expect.
- :meth:`ResNet18.load_backbone` reads a local state dict (``torch.load(weights_only=True)``):
  a torchvision ``resnet18`` state dict, or a ``model.pt`` from an earlier Runway resnet18 run.
  The classifier head is never loaded (the class count differs). A 3-channel first convolution
  is summed over its input channels for grey images; with the small stem it is trained afresh.
- :meth:`ResNet18.freeze_backbone` trains only the head (and a re-initialised stem); frozen
  batch-norm layers stay in eval mode so their running statistics do not drift either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.io import load_error
from pipeline.models.cnn import Scale

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SMALL_INPUT = 32  # below this side length the stem is adapted
FEATURES = 512


class WeightsError(ValueError):
    """A pretrained weights file that cannot be used."""


class ResNet18(nn.Module):
    def __init__(
        self,
        image_shape: list[int],
        n_classes: int,
        pixel_range: list[float] | None,
        dropout: float = 0.0,
    ) -> None:
        from torchvision.models import resnet18

        super().__init__()
        if pixel_range is None or len(image_shape) != 3:
            raise ValueError("resnet18 needs images (channels × height × width)")
        channels, height, width = image_shape
        self.scale = Scale.for_range(pixel_range, channels)
        if channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:  # the ImageNet channel average for grey (or other) images
            mean, std = [0.449] * channels, [0.226] * channels
        self.register_buffer("mean", torch.tensor(mean).reshape(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, channels, 1, 1))
        self.small_stem = min(height, width) < SMALL_INPUT
        backbone = resnet18(weights=None)
        if self.small_stem:
            backbone.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
        elif channels != 3:
            backbone.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURES, n_classes))
        self._frozen: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (self.scale(x) - self.mean) / self.std
        return self.head(self.backbone(x))

    def load_backbone(self, path: Path | str) -> list[str]:
        """Load pretrained backbone weights; return the backbone keys left as initialised."""
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle payload, a truncated file, not a torch file
            raise WeightsError(
                f"{path}: cannot load as a weights-only state dict: {load_error(exc)}"
            ) from None
        for key in ("state_dict", "model"):
            if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
                loaded = loaded[key]
        if not isinstance(loaded, dict) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()
        ):
            raise WeightsError(f"{path}: not a state dict (a mapping of names to tensors)")
        if any(k.startswith("backbone.") for k in loaded):  # a Runway resnet18 model.pt
            loaded = {k[9:]: v for k, v in loaded.items() if k.startswith("backbone.")}
        state = {k: v for k, v in loaded.items() if not k.startswith("fc.")}
        conv1 = state.get("conv1.weight")
        own = self.backbone.conv1.weight
        if conv1 is not None and conv1.shape != own.shape:
            if conv1.shape[2:] == own.shape[2:] and own.shape[1] == 1:
                state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)  # RGB stem → grey
            else:  # the small stem (3×3) cannot take the 7×7 ImageNet kernels
                del state["conv1.weight"]
        expected = self.backbone.state_dict()
        wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        if wrong:
            shapes = ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3]
            )
            raise WeightsError(f"{path}: tensor shapes do not fit a resnet18: {shapes}")
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if unexpected or len(missing) > 1 or (missing and missing != ["conv1.weight"]):
            raise WeightsError(
                f"{path}: not resnet18 weights: {len(missing)} missing key(s) "
                f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}"
            )
        return list(missing)

    def freeze_backbone(self, except_stem: bool = False) -> None:
        """Train only the head (and the stem when it was not loaded)."""
        trainable = {"conv1", "bn1"} if except_stem else set()
        self._frozen = []
        for name, module in self.backbone.named_children():
            if name in trainable:
                continue
            for p in module.parameters():
                p.requires_grad_(False)
            self._frozen.append(module)
        self.train(self.training)  # Lightning keeps each submodule's mode as it finds it

    def train(self, mode: bool = True) -> ResNet18:
        super().train(mode)
        for module in self._frozen:
            module.eval()  # frozen batch-norm statistics stay as loaded
        return self


def build_resnet18(
    image_shape: list[int],
    n_classes: int,
    pixel_range: list[float] | None,
    channels: int = 32,
    dropout: float = 0.2,
) -> ResNet18:
    """ResNet-18 from scratch (``channels`` does not apply: the widths are torchvision's)."""
    return ResNet18(image_shape, n_classes, pixel_range, dropout)
