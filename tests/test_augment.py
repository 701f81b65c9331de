"""DeviceAugment: shapes, range, seeding, the identity path, and each operation against
torchvision's own functional version."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from online_stablerep.config.schema import AugmentConfig
from online_stablerep.training.augment import DeviceAugment, _blend, _gray, _shift_hue

MEAN = torch.tensor(AugmentConfig().mean).view(1, 3, 1, 1)
STD = torch.tensor(AugmentConfig().std).view(1, 3, 1, 1)

NO_RANDOM_OPS = dict(
    crop_scale_min=1.0, crop_scale_max=1.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
    flip_p=0.0, downsample_p=0.0,
)


def images(n: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def run(cfg: AugmentConfig, batch: torch.Tensor, out: int, seed: int = 0) -> torch.Tensor:
    return DeviceAugment(cfg, out)(batch, torch.Generator().manual_seed(seed))


def test_shapes_dtype_and_range() -> None:
    out = run(AugmentConfig(downsample_p=0.5), images(), 32)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    pixels = unnormalise(out)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_same_seed_same_views_other_seed_other_views() -> None:
    batch = images()
    cfg = AugmentConfig(downsample_p=0.5)
    torch.testing.assert_close(run(cfg, batch, 32, seed=3), run(cfg, batch, 32, seed=3),
                               rtol=0, atol=0)
    assert not torch.allclose(run(cfg, batch, 32, seed=3), run(cfg, batch, 32, seed=4))


def test_without_random_ops_it_is_a_plain_resize() -> None:
    batch = images(size=64)
    cfg = AugmentConfig(**NO_RANDOM_OPS)
    # Same size: the exact pixels; half size: roi_align averages each 2x2 block.
    torch.testing.assert_close(unnormalise(run(cfg, batch, 64)), batch.float() / 255)
    torch.testing.assert_close(
        unnormalise(run(cfg, batch, 32)), F.avg_pool2d(batch.float() / 255, 2)
    )


def test_crop_boxes_follow_random_resized_crop_rules() -> None:
    augment = DeviceAugment(AugmentConfig(crop_scale_min=0.08, crop_scale_max=1.0), 32)
    boxes = augment._crop_boxes(2000, 256, 256, torch.Generator().manual_seed(0))
    left, top, right, bottom = boxes.unbind(1)
    width, height = right - left, bottom - top
    assert (left >= 0).all() and (top >= 0).all() and (right <= 256).all() and (bottom <= 256).all()
    area = width * height / 256**2
    assert area.min() >= 0.07 and area.max() <= 1.0 and area.max() > 0.9
    ratio = width / height
    assert ratio.min() >= 0.74 and ratio.max() <= 1.35


def test_flip_and_grayscale_apply_when_certain() -> None:
    batch = images()
    plain = run(AugmentConfig(**NO_RANDOM_OPS), batch, 32)
    flipped = run(AugmentConfig(**{**NO_RANDOM_OPS, "flip_p": 1.0}), batch, 32)
    torch.testing.assert_close(flipped, plain.flip(-1))
    gray = unnormalise(run(AugmentConfig(**{**NO_RANDOM_OPS, "grayscale_p": 1.0}), batch, 32))
    torch.testing.assert_close(gray[:, 0], gray[:, 2])
    torch.testing.assert_close(gray[:, :1], _gray(unnormalise(plain)))


def test_downsample_path_blurs_the_view() -> None:
    batch = images(size=64)
    plain = unnormalise(run(AugmentConfig(**NO_RANDOM_OPS), batch, 64))
    down = unnormalise(run(AugmentConfig(**{**NO_RANDOM_OPS, "downsample_p": 1.0}), batch, 64))
    assert down.shape == plain.shape
    # Shrinking to 18 or 37 px and back removes the high frequencies of the noise image.
    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean()
    assert roughness(down) < 0.5 * roughness(plain)


def test_colour_operations_match_torchvision() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    factors = torch.tensor([0.6, 1.0, 1.3, 1.4])
    hues = torch.tensor([-0.1, 0.0, 0.05, 0.1])
    for i in range(4):
        sample = x[i : i + 1]
        torch.testing.assert_close(
            _blend(sample, torch.zeros_like(sample), factors[i : i + 1]),
            TF.adjust_brightness(sample, float(factors[i])),
        )
        mean = _gray(sample).mean(dim=(1, 2, 3), keepdim=True)
        torch.testing.assert_close(
            _blend(sample, mean, factors[i : i + 1]), TF.adjust_contrast(sample, float(factors[i]))
        )
        torch.testing.assert_close(
            _blend(sample, _gray(sample), factors[i : i + 1]),
            TF.adjust_saturation(sample, float(factors[i])),
        )
    expected_hue = torch.cat([TF.adjust_hue(x[i : i + 1], float(hues[i])) for i in range(4)])
    torch.testing.assert_close(_shift_hue(x, hues), expected_hue, atol=1e-5, rtol=1e-5)


def test_blur_matches_torchvision_gaussian_blur() -> None:
    augment = DeviceAugment(AugmentConfig(), 32)
    x = torch.rand(3, 3, 32, 32)
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    size = 2 * augment.blur_radius + 1
    expected = torch.cat(
        [TF.gaussian_blur(x[i : i + 1], [size, size], [float(s)] * 2) for i, s in enumerate(sigmas)]
    )
    torch.testing.assert_close(augment._blur(x, sigmas), expected, atol=1e-5, rtol=1e-5)


def test_blur_sigma_and_downsample_scale_with_output_size() -> None:
    augment = DeviceAugment(AugmentConfig(blur_sigma_min=0.1, blur_sigma_max=2.0), 112)
    assert augment.sigma_range == pytest.approx((0.05, 1.0))
    assert augment.downsample_sizes == (32, 64)


def test_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        run(AugmentConfig(), images().float(), 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_views_and_are_seeded() -> None:
    batch = images(n=16, size=64)
    cfg = AugmentConfig(downsample_p=0.5)
    augment = DeviceAugment(cfg, 32)
    on_cuda = augment(batch.cuda(), torch.Generator().manual_seed(1))
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.float32
    torch.testing.assert_close(on_cuda.cpu(), run(cfg, batch, 32, seed=1), atol=1e-3, rtol=1e-3)

    def cuda_generator() -> torch.Generator:
        return torch.Generator(device="cuda").manual_seed(2)

    first = augment(batch.cuda(), cuda_generator())
    torch.testing.assert_close(first, augment(batch.cuda(), cuda_generator()), atol=0, rtol=0)
