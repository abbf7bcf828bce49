"""backbone.py's image augmentation, batched on the training device, with nothing read from or copied to the host.

A training step on a GPU is only as fast as the GPU when the host never waits for it. Every random number here
comes from a ``torch.Generator`` on the images' device, every constant is a Python number (a kernel argument)
and every shape is known to the host, so no call copies a host tensor to the device or reads a device value
back. torchvision's RandAugment builds its affine matrices and sharpness kernel with ``torch.tensor`` on every
call (a host-to-device copy from pageable memory waits for the device's queue),
and its autocontrast indexes with a boolean mask (which reads the number of true elements back).

Images are uint8 ``[B, 3, H, W]`` on entry and exit; each op works on float copies of the integer pixel values
and rounds, so a result is a valid uint8 image after every op, as with torchvision.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import equalize

from envs.errors import UsageError

NUM_BINS = 31  # torchvision's magnitude bins: magnitude m applies m/30 of each op's largest change

# torchvision's RandAugment ops, in its order
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast", "equalize")
GEOMETRY = {"rotate": "angle", "shear_x": "shear_x", "shear_y": "shear_y", "translate_x": "right",
            "translate_y": "down"}  # the geometric ops and the argument of source_grid that each one sets


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop after reflect padding, and a horizontal flip with chance 1/2, of a uint8 batch."""
    batch, _, height, width = images.shape
    dev = images.device
    padded = F.pad(images.float(), (padding,) * 4, mode="reflect")
    top = torch.randint(0, 2 * padding + 1, (batch, 1, 1), generator=generator, device=dev)
    left = torch.randint(0, 2 * padding + 1, (batch, 1, 1), generator=generator, device=dev)
    rows = (top + torch.arange(height, device=dev).view(1, -1, 1)).expand(batch, height, width)
    cols = (left + torch.arange(width, device=dev).view(1, 1, -1)).expand(batch, height, width)
    flip = torch.rand(batch, generator=generator, device=dev) < 0.5
    cols = torch.where(flip.view(-1, 1, 1), padded.shape[-1] - 1 - cols, cols)
    index = torch.arange(batch, device=dev).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2).to(torch.uint8)


class RandAugment:
    """RandAugment as torchvision's ``v2.RandAugment(num_ops, magnitude)`` defines it (31 magnitude bins, nearest
    interpolation, black fill), drawn per image, for a whole batch on its device.

    Each of ``num_ops`` rounds gives every image one of the 14 :data:`OPS` with equal chance and, for the signed
    ops (geometry and the four enhancements), a random sign. At magnitude m the largest changes are torchvision's
    times m/30: shear 0.3, translation 150/331 of the image side (whole pixels, truncated), rotation 30 degrees,
    enhancement factor 1 +- 0.9, posterize to 8 - round(m/7.5) bits, solarize at 255 (1 - m/30) and above.

    What differs from torchvision, which applies one drawn op to all of a batch it is given: here each image has
    its own op. To compute each op once, on only its images,
    with sizes the host knows, a round deals the batch at random into 14 equal groups of slots, one group per op
    (:meth:`one_op_each`); an image still gets each op with chance exactly 1/14, but the images of one batch draw
    their ops without replacement from the slots rather than independently. Blends and autocontrast round to the
    nearest level where torchvision truncates, so those pixels differ by at most one level. Equalize is
    torchvision's own batched ``equalize``, which draws nothing and reads nothing back.
    """

    def __init__(self, num_ops: int, magnitude: int) -> None:
        if num_ops < 0:
            raise UsageError(f"RandAugment needs num_ops >= 0, got {num_ops}")
        if not 0 <= magnitude < NUM_BINS:
            raise UsageError(f"RandAugment magnitude must be in [0, {NUM_BINS - 1}] (torchvision's bins), "
                             f"got {magnitude}")
        self.num_ops = num_ops
        fraction = magnitude / (NUM_BINS - 1)
        self.shear = 0.3 * fraction
        self.translate = 150 / 331 * fraction  # of the image's width or height
        self.degrees = 30 * fraction
        self.enhance = 0.9 * fraction
        self.bits = round(8 - magnitude / ((NUM_BINS - 1) / 4))
        self.threshold = 255 * (1 - fraction)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``num_ops`` random ops on each image of a uint8 ``[B, 3, H, W]`` batch, drawn from ``generator``."""
        x = images.float()
        for _ in range(self.num_ops):
            x = self.one_op_each(x, generator)
        return x.to(torch.uint8)

    def one_op_each(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random op on each image of float pixel values ``[B, 3, H, W]``. The images take random places
        among 14 groups of ceil(B / 14) slots, group k doing ``OPS[k]``, each slot with a random sign; the slots
        left over compute a copy of image 0 that is dropped."""
        group = -(-len(x) // len(OPS))
        slots = group * len(OPS)
        place = torch.randperm(slots, generator=generator, device=x.device)[:len(x)]  # image i sits in place[i]
        sign = torch.randint(2, (slots,), generator=generator, device=x.device).float() * 2 - 1
        occupant = torch.zeros(slots, dtype=torch.long, device=x.device)
        occupant.scatter_(0, place, torch.arange(len(x), device=x.device))
        groups = zip(OPS, x.index_select(0, occupant).split(group), sign.split(group), strict=True)
        done = torch.cat([self.apply(name, images, signs) for name, images, signs in groups])
        return done.index_select(0, place)

    def apply(self, name: str, x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """Op ``name`` of :data:`OPS` at this magnitude on float pixel values ``[n, 3, H, W]``, in the direction
        ``sign`` (+-1, ``[n]``) per image where the op has one."""
        height, width = x.shape[-2:]
        if name in GEOMETRY:
            largest = {"rotate": self.degrees, "shear_x": self.shear, "shear_y": self.shear,
                       "translate_x": int(self.translate * width), "translate_y": int(self.translate * height)}
            forward, backward = (_op_grid(name, direction * largest[name], height, width, x.device)
                                 for direction in (1, -1))
            return warp(x, torch.where((sign > 0).view(-1, 1, 1, 1), forward, backward))
        if name == "brightness":
            return blend(x, 0.0, 1 + sign * self.enhance)
        if name == "color":
            return blend(x, grayscale(x), 1 + sign * self.enhance)
        if name == "contrast":
            return blend(x, grayscale(x).mean((-3, -2, -1), keepdim=True), 1 + sign * self.enhance)
        if name == "sharpness":
            return blend(x, blurred(x), 1 + sign * self.enhance)
        if name == "posterize":
            return posterize(x, self.bits)
        if name == "solarize":
            return solarize(x, self.threshold)
        if name == "autocontrast":
            return autocontrast(x)
        if name == "equalize":
            return equalize(x.to(torch.uint8)).float()
        if name == "identity":
            return x
        raise ValueError(f"unknown RandAugment op {name!r}: one of {', '.join(OPS)}")


def source_grid(height: int, width: int, device: torch.device | str, angle: float = 0.0, shear_x: float = 0.0,
                shear_y: float = 0.0, right: float = 0.0, down: float = 0.0) -> torch.Tensor:
    """Where each pixel of an ``height`` x ``width`` image takes its value from, ``[H, W, 2]`` in
    ``grid_sample``'s coordinates (``align_corners=False``), for torchvision's Rotate, ShearX/ShearY and
    TranslateX/TranslateY: rotation by ``angle`` degrees counter-clockwise about the image centre; shear
    ``shear_x = s`` moves the pixels of row y by -s (y + 1/2) columns (about the top-left corner), ``shear_y``
    moves columns alike; translation moves the image ``right`` and ``down`` by whole pixels. RandAugment sets
    one of them; several at once add their displacements, which is not their composition. Built on
    ``device`` from ``arange``, so nothing is copied from the host."""
    cols = torch.arange(width, device=device, dtype=torch.float32).view(1, -1)
    rows = torch.arange(height, device=device, dtype=torch.float32).view(-1, 1)
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # the inverse map: output pixel (cols, rows) samples input point (src_x, src_y)
    src_x = cx + cos * (cols - cx) - sin * (rows - cy) + shear_x * (rows + 0.5) - right
    src_y = cy + sin * (cols - cx) + cos * (rows - cy) + shear_y * (cols + 0.5) - down
    return torch.stack(((2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1), dim=-1)


@functools.lru_cache(maxsize=64)
def _op_grid(name: str, amount: float, height: int, width: int, device: torch.device) -> torch.Tensor:
    """:func:`source_grid` of geometric op ``name`` by ``amount``, built once per image size and device: a
    step then picks each image's direction with one ``where`` instead of building its grid."""
    return source_grid(height, width, device, **{GEOMETRY[name]: amount})


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` sampled at ``grid`` (``[B, H, W, 2]``, or ``[H, W, 2]`` for all images) as
    torchvision's RandAugment samples: nearest pixel, black outside."""
    return F.grid_sample(x, grid.expand(len(x), *grid.shape[-3:]), mode="nearest", padding_mode="zeros",
                         align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` luma with torchvision's (ITU-R 601) weights, truncated to whole levels as for uint8."""
    r, g, b = x.unbind(-3)
    return (r * 0.2989 + g * 0.587 + b * 0.114).floor().unsqueeze(-3)


def blurred(x: torch.Tensor) -> torch.Tensor:
    """Sharpness's degenerate image: PIL's smoothing filter (3x3, weight 5 in the middle, 1 around, over 13),
    rounded; the one-pixel border keeps the image's own pixels."""
    inner = x[..., 1:-1, 1:-1]
    smoothed = ((F.avg_pool2d(x, 3, stride=1) * 9 + 4 * inner) / 13).round()
    return F.pad(smoothed - inner, (1, 1, 1, 1)) + x


def blend(x: torch.Tensor, degenerate: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor (x - degenerate)`` with a factor ``[B]`` per image, rounded
    into [0, 255]."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 255).round()


def posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the top ``bits`` bits of each level."""
    step = 2 ** (8 - bits)
    return torch.floor(x / step) * step


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert the levels at or above ``threshold``."""
    return torch.where(x >= threshold, 255 - x, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to span [0, 255]; a channel of one level is left as it is."""
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    flat = high == low
    low = torch.where(flat, 0.0, low)
    span = torch.where(flat, 255.0, high - low)
    return ((x - low) * (255 / span)).clamp(0, 255).round()
