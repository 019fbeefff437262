"""Augmentation and the last steps before the model, on tensors: one image or a whole batch.

``PadCropFlip`` augments one image (the DataLoader path); ``pad_crop_flip`` is the same transform on a
batch, which ``TensorBatches`` runs on the training device. ``resize_and_normalize`` turns images in
[0, 1] into the model's input on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PadCropFlip", "pad_crop_flip", "resize_and_normalize"]


def pad_crop_flip(
    x: torch.Tensor, pad: int, offsets: torch.Tensor | None, flips: torch.Tensor | None
) -> torch.Tensor:
    """Translate a batch by zero-padding and cropping back, then mirror the chosen images.

    Args:
        x: (B, C, H, W) images in [0, 1], before normalization (so the padding is black).
        pad: pixels of padding on each side.
        offsets: (B, 2) integer crop origins (row, column) in ``0..2*pad``; unused (None) when pad is 0.
        flips: (B,) bools, True mirrors that image left-right; None for no flips.
    """
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B,H,W,C) -> (B,C,H,W)
    if flips is not None:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    return x.contiguous()


class PadCropFlip:
    """Random translation by zero-padding and cropping back, optionally with a horizontal flip.

    Works on one (C, H, W) image in [0, 1], before normalization, so the padding is black: the
    background of digits and what CIFAR's standard recipe pads with. Draws from torch's global RNG,
    which the DataLoader seeds per worker, so runs are reproducible. ``TensorBatches`` applies the
    same transform to whole batches on the training device (``pad_crop_flip``).
    """

    def __init__(self, pad: int, flip: bool):
        self.pad, self.flip = pad, flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        offsets = torch.randint(0, 2 * self.pad + 1, (1, 2)) if self.pad > 0 else None
        flips = (torch.rand(()) < 0.5).view(1) if self.flip else None
        return pad_crop_flip(x[None], self.pad, offsets, flips)[0]


def resize_and_normalize(x: torch.Tensor, input_size, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, C0, H0, W0) images in [0, 1] -> resized to ``input_size``, gray repeated, normalized."""
    c, h, w = input_size
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = x.expand(-1, c, -1, -1)  # gray -> RGB when asked; a no-op otherwise
    return (x - mean) / std
