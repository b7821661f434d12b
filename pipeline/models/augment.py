"""Batched image augmentation on tensors, on the training device.

torchvision's v2 transforms draw one set of random parameters per call, so applied to a batch
every image would get the same crop. Here the pixel operations come from
``torchvision.transforms.v2.functional`` and the randomness is drawn per image: each image gets
its own crop offset and its own coin flip, in a handful of tensor operations per batch.
"""

from __future__ import annotations

import torch

AUGMENTATIONS = ("crop", "flip")


def crop_padding(height: int, width: int) -> int:
    """Pixels of padding for a random crop: an eighth of the side (4 for 32×32, 1 for 8×8)."""
    return max(1, min(height, width) // 8)


def random_crop(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image by :func:`crop_padding` and crop it back at a random offset."""
    from torchvision.transforms.v2 import functional as F

    n, _, height, width = x.shape
    pad = crop_padding(height, width)
    padded = F.pad(x, [pad, pad, pad, pad], fill=0)
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    rows = (dy + torch.arange(height, device=x.device))[:, :, None]  # n × H × 1
    cols = (dx + torch.arange(width, device=x.device))[:, None, :]  # n × 1 × W
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing gives n × H × W × C; put channels back in front.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Mirror a random half of the images left-right."""
    from torchvision.transforms.v2 import functional as F

    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], F.horizontal_flip(x), x)


def augment(x: torch.Tensor, kinds: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Apply the named augmentations (``crop``, ``flip``) to a batch of N×C×H×W images."""
    if "crop" in kinds:
        x = random_crop(x)
    if "flip" in kinds:
        x = random_flip(x)
    return x
