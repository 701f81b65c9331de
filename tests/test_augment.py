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


def test_blur_sigma_scales_with_output_size() -> None:
    augment = DeviceAugment(AugmentConfig(blur_sigma_min=0.1, blur_sigma_max=2.0), 112)
    assert augment.sigma_range == pytest.approx((0.05, 1.0))


def test_downsample_shrinks_the_whole_image_before_the_crop() -> None:
    # Official order: DownSampleAndUpsample on the whole (256 px) image, then the crop. With
    # one size, the views equal cropping the image that was shrunk and brought back by hand;
    # shrinking after the crop would give other pixels. Every random parameter is drawn in a
    # fixed order, so the same seed gives the same crop boxes with and without downsampling.
    batch = images(n=6, size=128)
    ops = {**NO_RANDOM_OPS, "crop_scale_min": 0.1, "crop_scale_max": 0.3}
    down = run(AugmentConfig(**{**ops, "downsample_p": 1.0, "downsample_sizes": [64]}), batch, 32,
               seed=5)
    small = F.interpolate(batch.float(), size=(32, 32), mode="bilinear", antialias=True,
                          align_corners=False)  # 64 px of a 256 px image = a quarter
    by_hand = F.interpolate(small, size=(128, 128), mode="bilinear", align_corners=False)
    augment = DeviceAugment(AugmentConfig(**ops), 32)
    boxes = augment._crop_boxes(6, 128, 128, torch.Generator().manual_seed(5))
    rois = torch.cat([torch.arange(6, dtype=torch.float32)[:, None], boxes], 1)
    from torchvision.ops import roi_align

    expected = roi_align(by_hand, rois, output_size=32, spatial_scale=1.0, sampling_ratio=-1,
                         aligned=True) / 255
    torch.testing.assert_close(unnormalise(down), expected, atol=1e-5, rtol=1e-5)


def test_colour_jitter_applies_each_samples_own_order_like_torchvision() -> None:
    torch.manual_seed(0)
    augment = DeviceAugment(AugmentConfig(), 16)
    x = torch.rand(24, 3, 16, 16)
    orders = torch.stack([torch.randperm(4) for _ in range(24)])
    b, c, s = torch.full((24,), 1.3), torch.full((24,), 0.6), torch.full((24,), 1.5)
    h = torch.full((24,), 0.08)
    out = augment._color_jitter(x, {0: b, 1: c, 2: s, 3: h}, orders)
    ops = [lambda t: TF.adjust_brightness(t, 1.3), lambda t: TF.adjust_contrast(t, 0.6),
           lambda t: TF.adjust_saturation(t, 1.5), lambda t: TF.adjust_hue(t, 0.08)]
    for i in range(24):
        expected = x[i : i + 1]
        for op in orders[i].tolist():
            expected = ops[op](expected)
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-4, rtol=1e-4)
    # The order matters for these factors: not every sample got the same result.
    assert not torch.allclose(out[orders[:, 0] == 0][:1], out[orders[:, 0] == 1][:1])


def test_jitter_order_is_drawn_per_sample() -> None:
    # Same image everywhere, jitter always on with fixed factors: views differ only through
    # the order of the four operations, so a batch shows several distinct results.
    cfg = AugmentConfig(**{**NO_RANDOM_OPS, "color_jitter_p": 1.0, "brightness": 0.0,
                           "contrast": 0.0, "saturation": 0.0, "hue": 0.0})
    batch = images(n=1, size=16).expand(48, -1, -1, -1).contiguous()
    assert torch.allclose(run(cfg, batch, 16), run(cfg, batch, 16)[:1].expand(48, -1, -1, -1))
    cfg = AugmentConfig(**{**NO_RANDOM_OPS, "color_jitter_p": 1.0, "brightness": 0.5,
                           "contrast": 0.5, "saturation": 0.5, "hue": 0.2})
    out = run(cfg, batch, 16)
    assert len({tuple(v.flatten()[:8].tolist()) for v in out}) > 20


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
