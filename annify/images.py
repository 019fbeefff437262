"""Reading images for inference: a file as the spec's input, as the trained network expects it.

``predict`` and ``serve`` read images here; image-folder training reads its files through
``image_mode`` too, so a 16-bit or float image means the same thing in training and inference.
Resizing, cropping and the default normalization follow the model's timm data config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from annify.errors import DataError, InferenceError

__all__ = ["data_config", "image_mode", "image_transform", "load_image"]


def data_config(spec) -> dict:
    """timm's resolved data config for the spec's model, at the spec's input size.

    Read from the registered pretrained config (so the mean and std are those the model family is
    trained with: ImageNet's for timm models, CIFAR's for cifar_resnet); a model with no registered
    config is built once to ask it.
    """
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    import annify.models  # noqa: F401 - registers cifar_resnet

    args = {"input_size": tuple(spec.input_size)}
    try:
        cfg = get_pretrained_cfg(spec.model)
    except RuntimeError:
        cfg = None
    if cfg is not None:
        return resolve_data_config(args, pretrained_cfg=cfg.to_dict())
    from annify.sources import create_model

    return resolve_data_config(args, model=create_model(spec.model, spec.num_classes, **spec.model_kwargs))


def _per_channel(values: Sequence[float], channels: int, given: str | None = None) -> tuple[float, ...]:
    """One value per channel: ``values`` as they are, or one repeated. A model's own 3-channel config
    (``given`` None) is averaged for a 1-channel input; values a user gives (``given``: the option)
    must be one or one per channel."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and given is None:
        return (sum(values) / len(values),)
    raise InferenceError(
        f"{given or 'normalization'} has {len(values)} values but the network takes {channels}-channel "
        f"images; give one value per channel ({channels}) or one for all"
    )


def image_transform(spec, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """timm's eval transform for the spec's input: resize, center-crop, normalize (built once per call site).

    Resizing and cropping follow the model's data config (``crop_pct``, interpolation); ``mean`` and
    ``std`` default to the model's data config too (a 3-channel mean is averaged for a 1-channel input).
    """
    from timm.data import create_transform

    channels = spec.input_size[0]
    if channels not in (1, 3):
        raise InferenceError(f"images can feed 1- or 3-channel inputs, this spec takes {channels}")
    cfg = data_config(spec)
    for option, values in (("--mean", mean), ("--std", std)):
        bad = [v for v in values or () if not math.isfinite(v) or (option == "--std" and v <= 0)]
        if bad:
            need = "positive numbers (each channel's spread)" if option == "--std" else "finite numbers"
            raise InferenceError(f"{option} must be {need}, got {bad[0]:g}")
    return create_transform(
        input_size=tuple(spec.input_size),
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
        mean=_per_channel(
            cfg["mean"] if mean is None else mean, channels, None if mean is None else "--mean"
        ),
        std=_per_channel(cfg["std"] if std is None else std, channels, None if std is None else "--std"),
        is_training=False,
    )


def image_mode(im, channels: int, name: str = "image"):
    """A PIL image as the ``L`` (1 channel) or ``RGB`` (3 channels) image a network reads, without squashing it.

    PIL's own ``convert`` clips what it cannot map: a 16-bit gray PNG's values above 255 all become
    255, and a float image in [0, 1] becomes black. Here 16-bit images are scaled (÷257), float images
    in [0, 1] are scaled by 255 (in [0, 255] kept; any other range is refused), palette images are
    mapped through their palette, CMYK goes through PIL's conversion to RGB, and transparency is
    composited on white. ``predict`` and image-folder training both read images through this.
    """
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode == "P":  # through the palette, keeping its transparency as alpha
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        im = Image.fromarray(np.round(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8), "L")
    elif mode in ("I", "F"):
        values = np.asarray(im, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > (65535 if mode == "I" else 255):
            raise DataError(
                f"cannot read image '{name}': its {'32-bit integer' if mode == 'I' else 'float'} pixels range "
                f"from {low:g} to {high:g}, which is no image range annify knows (0..1, 0..255"
                f"{', 0..65535' if mode == 'I' else ''}); save it as an 8- or 16-bit PNG"
            )
        scale = 255.0 if mode == "F" and high <= 1.0 else 1 / 257 if high > 255 else 1.0
        im = Image.fromarray(np.round(values * scale).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    if im.mode not in ("1", "L", "RGB", "RGBA", "CMYK", "YCbCr", "RGBX"):
        raise DataError(
            f"cannot read image '{name}': PIL mode {mode} is not one annify converts (gray, RGB, CMYK, palette, "
            "16-bit, float, with or without alpha); convert it to RGB first"
        )
    return im.convert("L" if channels == 1 else "RGB")


def load_image(
    path, spec, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, transform=None
) -> torch.Tensor:
    """Read an image file as the spec's input: C×H×W, resized, center-cropped and normalized.

    The image is converted to the spec's channel count by ``image_mode`` and passed through
    ``transform`` (``image_transform(spec, mean, std)`` when not given; pass one to read many images).
    """
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    transform = transform if transform is not None else image_transform(spec, mean, std)
    channels = spec.input_size[0]
    try:
        with Image.open(path) as im:
            im = image_mode(im, channels, str(path))
    except FileNotFoundError:
        raise InferenceError(f"cannot read image '{path}': no such file") from None
    except UnidentifiedImageError:
        raise InferenceError(f"cannot read image '{path}': not an image format PIL can read") from None
    except DecompressionBombError:
        raise InferenceError(
            f"cannot read image '{path}': too many pixels for PIL's decompression-bomb limit; downscale it first"
        ) from None
    except DataError as e:
        raise InferenceError(str(e)) from None
    except (OSError, ValueError) as e:
        raise InferenceError(f"cannot read image '{path}': {e}") from None
    return transform(im)
