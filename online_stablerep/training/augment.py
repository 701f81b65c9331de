"""StableRep's view augmentation, batched on the trainer's device from uint8 images.

Every sample draws its own parameters, but each operation runs once on the whole batch: the
crop as one roi_align call, the colour operations with per-sample factors broadcast, the blur
as one grouped convolution. Operations a sample skips are selected away with torch.where, so
nothing loops over samples and nothing waits for the device. Order (as in the official
command): downsample of the whole image, RandomResizedCrop, ColorJitter (its four operations in
a random order per sample, as torchvision's ColorJitter draws per call), grayscale, Gaussian
blur, flip, normalise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from online_stablerep.config.schema import AugmentConfig

# Blur sigmas are given for 224 px views (the paper's) and scale with the output size, so a
# small CPU run sees the same relative strength; downsample sizes are given for the official
# 256 px stored images and scale with the stored size.
REFERENCE_SIZE = 224
DOWNSAMPLE_REFERENCE = 256
# ColorJitter's operations, in torchvision's numbering (its random order permutes these).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=g.device)


def _bernoulli(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) < p


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of (N, 3, H, W) RGB in [0, 1], torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor_n: torch.Tensor) -> torch.Tensor:
    factor = factor_n.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _shift_hue(x: torch.Tensor, shift_n: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (N, 3, H, W) RGB in [0, 1] by shift_n (fractions of a turn)."""
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(dim=1)
    hue = torch.where(
        maxc == r,
        (g - b) / safe_chroma,
        torch.where(maxc == g, 2 + (b - r) / safe_chroma, 4 + (r - g) / safe_chroma),
    )
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue)) / 6
    hue = (hue + shift_n.view(-1, 1, 1)) % 1.0
    # HSV -> RGB in closed form: channel c = v - chroma * clamp(min(t, 4 - t), 0, 1) with
    # t = (n_c + 6 hue) mod 6 and n = 5, 3, 1 for R, G, B.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    t = (n + 6 * hue.unsqueeze(1)) % 6
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(t, 4 - t).clamp(0, 1)


class DeviceAugment:
    """Random StableRep views of a uint8 batch, on the batch's device.

    Args:
        aug_cfg: probabilities and strengths (augment section of the config).
        out_size: side of the square output views (model.image_size).
    """

    def __init__(self, aug_cfg: AugmentConfig, out_size: int) -> None:
        self.cfg = aug_cfg
        self.out_size = out_size
        scale = out_size / REFERENCE_SIZE
        self.sigma_range = (aug_cfg.blur_sigma_min * scale, aug_cfg.blur_sigma_max * scale)
        # Reflect padding needs the radius below the image side.
        self.blur_radius = max(1, min(math.ceil(3 * self.sigma_range[1]), out_size - 1))

    def _crop_boxes(self, n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
        """(n, 4) RandomResizedCrop boxes x1, y1, x2, y2 in pixel-edge coordinates.

        torchvision's rule, vectorised: CROP_ATTEMPTS tries per sample, the first that fits
        wins, otherwise the largest centred crop within the ratio range.
        """
        shape = (n, CROP_ATTEMPTS)
        area = height * width * (
            self.cfg.crop_scale_min
            + (self.cfg.crop_scale_max - self.cfg.crop_scale_min)
            * torch.rand(shape, generator=g, device=g.device)
        )
        log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(shape, generator=g, device=g.device))
        w = torch.sqrt(area * ratio).round()
        h = torch.sqrt(area / ratio).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, attempts)
        first = fits.float().argmax(dim=1, keepdim=True)  # the first fitting attempt
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

        in_ratio = width / height
        if in_ratio < CROP_RATIO[0]:
            fallback_w, fallback_h = width, round(width / CROP_RATIO[0])
        elif in_ratio > CROP_RATIO[1]:
            fallback_w, fallback_h = round(height * CROP_RATIO[1]), height
        else:
            fallback_w, fallback_h = width, height
        any_fit = fits.any(dim=1)
        w = torch.where(any_fit, w, torch.full_like(w, fallback_w))
        h = torch.where(any_fit, h, torch.full_like(h, fallback_h))
        # Integer offsets uniform in [0, side - size], as torch.randint would draw them.
        top = torch.floor(torch.rand(n, generator=g, device=g.device) * (height - h + 1))
        left = torch.floor(torch.rand(n, generator=g, device=g.device) * (width - w + 1))
        top = torch.where(any_fit, top, torch.floor((height - h) / 2))
        left = torch.where(any_fit, left, torch.floor((width - w) / 2))
        return torch.stack([left, top, left + w, top + h], dim=1)

    def _blur(self, x: torch.Tensor, sigma_n: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with one sigma (in pixels) per sample, as a grouped conv."""
        n, c, height, width = x.shape
        offsets = torch.arange(-self.blur_radius, self.blur_radius + 1, device=x.device)
        kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma_n[:, None] ** 2))  # (N, K)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        size = kernel.shape[1]
        r = self.blur_radius
        flat = x.reshape(1, n * c, height, width)
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, size),
                        groups=n * c)
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), kernel.view(n * c, 1, size, 1),
                        groups=n * c)
        return flat.view(n, c, height, width)

    def _downsample(self, x: torch.Tensor, choice_n: torch.Tensor) -> torch.Tensor:
        """Shrink each whole image to one of the downsample sizes (by choice_n; -1 keeps it)
        and back to its size, as the official DownSampleAndUpsample before the crop."""
        out = x
        height, width = x.shape[-2:]
        for index, size in enumerate(self.cfg.downsample_sizes):
            side = max(1, round(size * height / DOWNSAMPLE_REFERENCE))
            small = F.interpolate(x, size=(side, max(1, round(side * width / height))),
                                  mode="bilinear", antialias=True, align_corners=False)
            back = F.interpolate(small, size=(height, width), mode="bilinear",
                                 align_corners=False)
            out = torch.where((choice_n == index).view(-1, 1, 1, 1), back, out)
        return out

    def _color_jitter(self, x: torch.Tensor, factors: dict[int, torch.Tensor],
                      order_n4: torch.Tensor) -> torch.Tensor:
        """ColorJitter with each sample's own order of the four operations.

        Args:
            x: (N, 3, H, W) RGB in [0, 1].
            factors: operation -> (N,) factor; identity (1, or hue 0) for samples without jitter.
            order_n4: (N, 4) each row a permutation of the operations.
        """
        for position in range(4):
            op_n = order_n4[:, position]
            for op in (BRIGHTNESS, CONTRAST, SATURATION):
                factor = torch.where(op_n == op, factors[op], torch.ones_like(factors[op]))
                if op == BRIGHTNESS:
                    x = _blend(x, torch.zeros_like(x), factor)
                elif op == CONTRAST:
                    x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)
                else:
                    x = _blend(x, _gray(x), factor)
            if self.cfg.hue > 0:
                # A zero shift is not an exact identity through HSV: skip it instead.
                shift = (op_n == HUE) & (factors[HUE] != 0)
                x = torch.where(shift.view(-1, 1, 1, 1), _shift_hue(x, factors[HUE]), x)
        return x

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment (N, 3, H, W) uint8 images into (N, 3, out, out) normalised fp32 views.

        Args:
            images: uint8 batch on any device.
            generator: source of every random parameter (drawn on its device, then moved);
                the same generator state gives the same views.

        Raises:
            ValueError: when images are not a uint8 (N, 3, H, W) batch.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        cfg, g, device = self.cfg, generator, images.device
        n, _, height, width = images.shape

        # 1. Every random parameter, drawn in a fixed order whatever the probabilities are.
        boxes = self._crop_boxes(n, height, width, g)
        jitter = _bernoulli(n, cfg.color_jitter_p, g)
        brightness = _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, g)
        contrast = _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, g)
        saturation = _uniform(n, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, g)
        hue = _uniform(n, -cfg.hue, cfg.hue, g)
        gray = _bernoulli(n, cfg.grayscale_p, g)
        blur = _bernoulli(n, cfg.blur_p, g)
        sigma = _uniform(n, *self.sigma_range, g)
        flip = _bernoulli(n, cfg.flip_p, g)
        down = _bernoulli(n, cfg.downsample_p, g)
        down_choice = torch.randint(len(cfg.downsample_sizes), (n,), generator=g, device=g.device)
        jitter_order = torch.rand((n, 4), generator=g, device=g.device).argsort(dim=1)
        params = [boxes, jitter, brightness, contrast, saturation, hue, gray, blur, sigma, flip,
                  jitter_order]
        boxes, jitter, brightness, contrast, saturation, hue, gray, blur, sigma, flip, order = (
            p.to(device) for p in params
        )
        down_choice = torch.where(down, down_choice, torch.full_like(down_choice, -1)).to(device)

        # 2. Downsample the whole image and back, for the few samples that draw it.
        x = images.float()
        if cfg.downsample_p > 0:
            x = self._downsample(x, down_choice)

        # 3. RandomResizedCrop; roi_align averages several samples per output pixel when the
        # crop shrinks, which keeps the resize free of aliasing.
        rois = torch.cat([torch.arange(n, device=device, dtype=torch.float32)[:, None], boxes], 1)
        x = roi_align(x, rois, output_size=self.out_size, spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True) / 255.0  # (N, 3, out, out)

        # 4. ColorJitter in each sample's order; samples without jitter get identity factors.
        if cfg.color_jitter_p > 0:
            one = torch.ones_like(brightness)
            factors = {
                BRIGHTNESS: torch.where(jitter, brightness, one),
                CONTRAST: torch.where(jitter, contrast, one),
                SATURATION: torch.where(jitter, saturation, one),
                HUE: torch.where(jitter, hue, torch.zeros_like(hue)),
            }
            x = self._color_jitter(x, factors, order)

        # 5. Grayscale (three equal channels), blur, flip.
        if cfg.grayscale_p > 0:
            x = torch.where(gray.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        if cfg.blur_p > 0:
            x = torch.where(blur.view(-1, 1, 1, 1), self._blur(x, sigma), x)
        if cfg.flip_p > 0:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

        # 6. ImageNet normalisation.
        mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
        return (x - mean) / std
