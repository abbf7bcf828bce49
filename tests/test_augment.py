"""envs/vit/augment.py: the batched RandAugment does torchvision's ops, one per image, reproducibly."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from envs.vit.augment import OPS, RandAugment, random_crop_flip, source_grid, warp

AUGMENT = RandAugment(num_ops=2, magnitude=9)


def images(count: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random uint8 images, and a smooth one (a stripe pattern) that blurs, equalizes and shears visibly."""
    noise = torch.randint(0, 256, (count - 1, 3, size, size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    stripes = torch.stack([cols * 8 % 256, rows * 8 % 256, (rows + cols) * 4 % 256]).to(torch.uint8)
    return torch.cat([noise, stripes[None]])


def torchvision_op(name: str, image: torch.Tensor, sign: float) -> torch.Tensor:
    """What torchvision's RandAugment does for op ``name`` at magnitude 9 of 31 bins, in direction ``sign``."""
    m = sign * 9 / 30
    side = image.shape[-1]
    if name in ("shear_x", "shear_y"):
        degrees = math.degrees(math.atan(0.3 * m))
        shear = [degrees, 0.0] if name == "shear_x" else [0.0, degrees]
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])
    if name in ("translate_x", "translate_y"):
        pixels = int(150 / 331 * side * m)
        return TF.affine(image, angle=0.0, translate=[pixels, 0] if name == "translate_x" else [0, pixels],
                         scale=1.0, shear=[0.0, 0.0])
    return {"identity": lambda: image, "rotate": lambda: TF.rotate(image, angle=30 * m),
            "brightness": lambda: TF.adjust_brightness(image, 1 + 0.9 * m),
            "color": lambda: TF.adjust_saturation(image, 1 + 0.9 * m),
            "contrast": lambda: TF.adjust_contrast(image, 1 + 0.9 * m),
            "sharpness": lambda: TF.adjust_sharpness(image, 1 + 0.9 * m),
            "posterize": lambda: TF.posterize(image, 7), "solarize": lambda: TF.solarize(image, 255 * 0.7),
            "autocontrast": lambda: TF.autocontrast(image), "equalize": lambda: TF.equalize(image)}[name]()


@pytest.mark.parametrize("name", OPS)
def test_each_op_is_torchvisions(name):
    """Geometry, posterize, solarize and equalize match torchvision pixel for pixel; blends and autocontrast
    round where torchvision truncates, so they may differ by one level. Every result is whole levels in
    [0, 255]."""
    batch = images()
    for sign in (1.0, -1.0):
        ours = AUGMENT.apply(name, batch.float(), torch.full((len(batch),), sign))
        assert ours.shape == batch.shape and torch.equal(ours, ours.round()) and 0 <= ours.min() <= ours.max() <= 255
        theirs = torch.cat([torchvision_op(name, image[None], sign) for image in batch]).float()
        tolerance = 1 if name in ("brightness", "color", "contrast", "sharpness", "autocontrast") else 0
        assert (ours - theirs).abs().max() <= tolerance, name


def test_ops_do_what_they_say_on_a_hand_made_image():
    image = torch.zeros(1, 3, 8, 8)
    image[0, :, 2, 3] = 200.0  # one bright pixel at row 2, column 3
    one = torch.ones(1)
    small = RandAugment(1, 9)
    moved = small.apply("translate_x", image, one)  # int(150 / 331 * 8 * 0.3) = 1 pixel to the right
    assert moved[0, 0, 2, 4] == 200 and moved.sum() == image.sum()
    assert torch.equal(small.apply("translate_y", image, -one)[0, :, 1, 3], image[0, :, 2, 3])  # one pixel up
    quarter = warp(image, source_grid(8, 8, image.device, angle=90))
    assert torch.equal(quarter, torch.rot90(image, 1, dims=(-2, -1)))  # counter-clockwise
    levels = torch.arange(0, 256, dtype=torch.float32).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(RandAugment(1, 30).apply("solarize", levels, one), 255 - levels)  # threshold 0: invert
    assert torch.equal(small.apply("posterize", levels, one), levels - levels % 2)  # 7 bits
    assert torch.equal(small.apply("brightness", levels, one), (levels * 1.27).clamp(max=255).round())
    middle = 50 + levels / 5  # levels 50 to 101
    assert small.apply("autocontrast", middle, one).aminmax() == (0, 255)
    flat = torch.full((1, 3, 4, 4), 77.0)
    for name in ("contrast", "color", "sharpness", "autocontrast", "equalize"):
        assert torch.equal(small.apply(name, flat, one), flat), name


def test_each_image_gets_its_own_op_and_a_seed_repeats_the_draws():
    """56 different images in a batch: 4 slots per op, so each op shows up on exactly 4 of them; each image comes
    out as an op of its own pixels (not of another image's), the signed ops are drawn in both directions, and
    another seed deals the ops otherwise. 44 images leave 12 of the 56 slots empty, and still every op is dealt.
    The images are noise in levels 20 to 209, so that every op (and each direction) changes each of them in its
    own way."""
    batch = torch.randint(0, 256, (56, 3, 32, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)) // 4 * 3 + 20
    once = RandAugment(num_ops=1, magnitude=9)
    candidates = {(name, sign): once.apply(name, batch.float(), torch.full((len(batch),), sign)).to(torch.uint8)
                  for name in OPS for sign in (1.0, -1.0)}

    def drawn(seed: int, count: int = 56) -> list[set[tuple[str, float]]]:
        """The (op, sign) pairs that give each of the first ``count`` images' result; both signs of an op without
        a direction."""
        out = once(batch[:count], torch.Generator().manual_seed(seed))
        assert out.dtype == torch.uint8 and out.shape == batch[:count].shape
        assert torch.equal(out, once(batch[:count], torch.Generator().manual_seed(seed)))
        return [{key for key, result in candidates.items() if torch.equal(result[i], image)}
                for i, image in enumerate(out)]

    first, second, uneven = drawn(0), drawn(1), drawn(0, 44)
    assert all(len({name for name, _ in keys}) == 1 for keys in first + second + uneven)  # one op of its own
    ops = [next(iter(keys))[0] for keys in first]
    assert sorted(ops) == sorted(OPS * 4)
    assert {sign for keys in first if len(keys) == 1 for _, sign in keys} == {1.0, -1.0}  # the signed ops
    assert [next(iter(keys))[0] for keys in second] != ops
    dealt = Counter(next(iter(keys))[0] for keys in uneven)
    assert set(dealt) == set(OPS) and max(dealt.values()) <= 4


def test_two_ops_change_every_image_and_crop_flip_keeps_pixels():
    batch = images(count=16)
    generator = torch.Generator().manual_seed(0)
    out = AUGMENT(batch, generator)
    changed = (out != batch).flatten(1).any(1)
    assert changed.float().mean() > 0.8  # an image keeps its pixels only if it drew identity twice (or a no-op)
    cropped = random_crop_flip(batch, 4, generator)
    assert cropped.shape == batch.shape and cropped.dtype == torch.uint8
    assert set(cropped.unique().tolist()) <= set(batch.unique().tolist())


def test_crop_flip_takes_a_random_window_of_each_padded_image_mirrored_half_the_time():
    """Each image comes out as a 32x32 window of itself reflect-padded by 4 pixels (torchvision's RandomCrop(32,
    4, padding_mode="reflect")), mirrored left to right or not (RandomHorizontalFlip); each image draws its
    window's row and column and its flip."""
    batch = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = F.pad(batch.float(), (4,) * 4, mode="reflect").to(torch.uint8)
    out = random_crop_flip(batch, 4, torch.Generator().manual_seed(0))
    windows = [(top, left, mirrored) for top in range(9) for left in range(9) for mirrored in (False, True)]

    def window(source: torch.Tensor, top: int, left: int, mirrored: bool) -> torch.Tensor:
        crop = source[:, top:top + 32, left:left + 32]
        return crop.flip(-1) if mirrored else crop

    drawn = [[w for w in windows if torch.equal(image, window(source, *w))]
             for image, source in zip(out, padded, strict=True)]
    assert all(len(matches) == 1 for matches in drawn)  # noise: no two windows of an image are alike
    drawn = [matches[0] for matches in drawn]
    assert {mirrored for _, _, mirrored in drawn} == {False, True}
    assert len({top for top, _, _ in drawn}) > 3 and len({left for _, left, _ in drawn}) > 3
    assert len(set(drawn)) > len({(top, mirrored) for top, _, mirrored in drawn})  # the column is drawn apart


def test_a_magnitude_outside_torchvisions_bins_is_refused():
    with pytest.raises(ValueError, match=r"magnitude must be in \[0, 30\]"):
        RandAugment(2, 31)
