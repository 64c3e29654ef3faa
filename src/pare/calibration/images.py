"""Calibration inputs of a vision tower (``component="vision"``): images as the tower takes them.

The calibration set of a vision cut is ``pixel_values [N, C, H, W]``, already normalised the way the
model's image processor normalises them (``processor(images=...)["pixel_values"]``; for Idefics3 /
SmolVLM take one image per row, ``pixel_values[:, 0]``). Without images, pare draws ``N`` images of
i.i.d. standard-normal pixels (seeded): after the processor's per-channel normalisation, real pixels
have roughly zero mean and unit variance, so these exercise the tower at the right scale, but they
carry no image structure. They are a data-free stand-in; scores from real images are better, and the
report says which was used.

Qwen-VL towers take patch rows, not images: :func:`patchify` lays images out as
``Qwen2VLImageProcessor`` does (``[B * P, C * T * p * p]`` and ``grid_thw``), so every family takes the
same ``[N, C, H, W]`` calibration tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from pare.arch.roles import ModelArch, VisionRoles
from pare.errors import ConfigError

RANDOM_SIDE_MERGES = 4
"""Merged tokens per side of a random image for a tower without a fixed image size (Qwen-VL)."""


def image_side(vision: VisionRoles) -> int:
    """The side of a calibration image: the tower's ``image_size``, or (Qwen-VL, any size that is a
    multiple of ``patch_size * merge_size``) :data:`RANDOM_SIDE_MERGES` merged tokens."""
    return vision.image_size or vision.patch_size * vision.merge_size * RANDOM_SIDE_MERGES


def random_images(vision: VisionRoles, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images ``[n, C, S, S]`` of seeded standard-normal pixels (see the module docstring)."""
    side = image_side(vision)
    return torch.randn(n, vision.channels, side, side, generator=torch.Generator().manual_seed(seed))


def check_images(vision: VisionRoles, pixels: Any) -> torch.Tensor:
    """``pixels`` if it is a floating ``[N, C, H, W]`` tensor the tower takes, else ConfigError saying why."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or not pixels.dtype.is_floating_point:
        got = (f"a {pixels.dim()}-D {pixels.dtype} tensor" if isinstance(pixels, torch.Tensor)
               else type(pixels).__name__)
        raise ConfigError(f"component='vision' calibrates on images: a floating tensor pixel_values [N, "
                          f"{vision.channels}, H, W] from the model's image processor (or None for random "
                          f"normalised pixels), got {got}")
    _, c, h, w = pixels.shape
    step = vision.patch_size * vision.merge_size
    if c != vision.channels:
        raise ConfigError(f"the images have {c} channels; the vision tower takes {vision.channels}")
    if vision.image_size and (h, w) != (vision.image_size, vision.image_size):
        raise ConfigError(f"the images are {h}x{w}; the vision tower takes {vision.image_size}x{vision.image_size} "
                          "(its position table has one row per patch of that size)")
    if h % step or w % step:
        raise ConfigError(f"the images are {h}x{w}; each side must be a multiple of {step} (patch size "
                          f"{vision.patch_size} x merge size {vision.merge_size})")
    return pixels


def patchify(images: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL patch rows of still images.

    Args:
        images: ``[B, C, H, W]``, ``H`` and ``W`` multiples of ``patch * merge``.

    Returns:
        ``(rows [B * P, C * temporal * patch * patch], grid_thw [B, 3])`` with ``P = (H / patch) * (W / patch)``,
        the patches of each merge window consecutive, each frame repeated ``temporal`` times.
    """
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)  # [b, gh/m, gw/m, m, m, c, 1, p, p]
    x = x.expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    rows = x.reshape(b * gh * gw, c * temporal * patch * patch)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=images.device)
    return rows, grid


def tower_inputs(vision: VisionRoles, batch: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """The keyword arguments the vision tower takes for a batch of images ``[B, C, H, W]``."""
    batch = batch.to(device)
    if vision.inputs == "images":
        return {"pixel_values": batch}
    rows, grid = patchify(batch, vision.patch_size, vision.merge_size, vision.temporal_patch_size)
    return {"hidden_states": rows, "grid_thw": grid}


def model_inputs(arch: ModelArch, batch: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """What the runner passes to the described part of the model: token ids to a decoder, images to a
    vision tower."""
    if arch.vision is not None:
        return tower_inputs(arch.vision, batch, device)
    return {"input_ids": batch.to(device), "use_cache": False}


def vision_calibration(arch: ModelArch, calibration: Any, nsamples: int = 16,
                       seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """The images a vision cut calibrates on and what the report records about them: ``calibration``
    checked, or ``nsamples`` random normalised images when it is None."""
    assert arch.vision is not None
    if calibration is None:
        images = random_images(arch.vision, nsamples, seed)
        return images, {"nsamples": nsamples, "images": "random", "seed": seed,
                        "size": list(images.shape[2:])}
    images = check_images(arch.vision, calibration)
    return images, {"nsamples": int(images.shape[0]), "images": "tensor", "size": list(images.shape[2:])}
