"""DeepCache feature reuse: the full path is the UNet, every=1 is no cache, every>1 skips the
deep blocks (fewer FLOPs) and stays close to the uncached images."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from online_stablerep.config.schema import GeneratorConfig
from online_stablerep.producers.feature_cache import DeepCacheUNet
from online_stablerep.producers.pipeline import build_components
from online_stablerep.producers.sampling import Sampler

CAPTIONS = ["a red car on a wet street", "two dogs on a sofa"]


def _images(cfg: GeneratorConfig, every: int) -> torch.Tensor:
    components = build_components(cfg, "cpu")
    sampler = Sampler(components, steps=cfg.steps, deep_cache_every=every)
    return sampler.generate(CAPTIONS, [(0, 0), (0, 1)], [2.0, 2.0], k=2, seed=0,
                            output_size=components.resolution)


def test_full_path_equals_the_unet_and_cached_path_is_cheaper(tiny_fp32_components):
    unet = tiny_fp32_components.unet
    wrapped = DeepCacheUNet(unet)
    x = torch.randn(2, 4, 32, 32)
    context = torch.randn(2, 77, 32)
    with torch.inference_mode():
        reference = unet(x, 500, encoder_hidden_states=context).sample
        with FlopCounterMode(display=False) as full_count:
            eps, feature = wrapped(x, 500, context)
        with FlopCounterMode(display=False) as cached_count:
            eps_cached, none = wrapped(x, 450, context, cached=feature)
    torch.testing.assert_close(eps, reference)
    assert none is None and eps_cached.shape == eps.shape
    assert cached_count.get_total_flops() < 0.8 * full_count.get_total_flops()


@pytest.mark.slow
def test_every_one_is_no_cache_and_every_two_stays_close():
    plain = GeneratorConfig(model="tiny", dtype="fp32", steps=6)
    cached = dataclasses.replace(plain, deep_cache_every=2)
    reference = _images(plain, 1)
    assert (_images(cached, 1).int() - reference.int()).abs().max() <= 1
    reused = _images(cached, 2)
    diff = (reused.int() - reference.int()).abs().float()
    assert diff.max() > 0 and diff.mean() < 40
