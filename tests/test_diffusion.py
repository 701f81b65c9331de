"""The diffusion producer on the tiny architecture: equal to stock diffusers, reproducible."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import CLIPTokenizer

from online_stablerep.config.schema import Config, GeneratorConfig
from online_stablerep.producers import build_producer
from online_stablerep.producers.pipeline import build_components, stock_pipeline
from online_stablerep.producers.sampling import Sampler, initial_noise
from online_stablerep.producers.tokenizer import (
    CLIP_VOCAB_SIZE,
    build_clip_tokenizer,
    check_vocab_size,
)

CAPTIONS = ["a red car on a wet street", "two dogs on a sofa", "a bowl of soup",
            "a lighthouse at dusk", "snow on pine trees"]


@pytest.fixture(scope="module")
def tiny():
    # channels_last and chunked decode on: the optimised path is what is compared with stock.
    cfg = GeneratorConfig(model="tiny", steps=3, dtype="fp32", channels_last=True,
                          vae_decode_chunk=3)
    return build_components(cfg, "cpu")


def test_offline_tokenizer_has_clip_vocabulary(tmp_path):
    tokenizer = build_clip_tokenizer(tmp_path)
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    ids = tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocab_check_rejects_a_tokenizer_without_vocabulary(tmp_path):
    build_clip_tokenizer(tmp_path)
    # Keyword names transformers does not read: it silently builds a 2-token tokenizer.
    broken = CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"),
                           merges_file=str(tmp_path / "merges.txt"))
    with pytest.raises(ValueError, match=f"expected {CLIP_VOCAB_SIZE}"):
        check_vocab_size(broken, CLIP_VOCAB_SIZE, "test")


@pytest.mark.parametrize("guidance", [2.0, 1.0])
def test_equal_to_stock_pipeline(tiny, guidance):
    k, caption_ids = 2, [(0, 3), (1, 8)]
    side = tiny.resolution // tiny.vae_scale_factor
    noise, _ = initial_noise(0, caption_ids, k, (4, side, side))
    ours = Sampler(tiny, steps=3, vae_decode_chunk=3).generate(
        CAPTIONS[:2], caption_ids, [guidance, guidance], k=k, seed=0, output_size=tiny.resolution)
    stock = stock_pipeline(tiny)(CAPTIONS[:2], num_images_per_prompt=k, num_inference_steps=3,
                         guidance_scale=guidance, latents=noise, output_type="pt").images
    stock_u8 = (stock * 255).round().to(torch.uint8)
    diff = (ours.flatten(0, 1).int() - stock_u8.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01


def test_per_caption_guidance_matches_stock_run_per_caption(tiny):
    sampler = Sampler(tiny, steps=3)
    side = tiny.resolution // tiny.vae_scale_factor
    ours = sampler.generate(CAPTIONS[:3], [(0, 0), (0, 1), (0, 2)], [2.0, 5.0, 1.0], k=1, seed=4,
                            output_size=tiny.resolution)
    for i, scale in enumerate([2.0, 5.0, 1.0]):
        noise, _ = initial_noise(4, [(0, i)], 1, (4, side, side))
        stock = stock_pipeline(tiny)(CAPTIONS[i], num_inference_steps=3, guidance_scale=scale,
                             latents=noise, output_type="pt").images
        assert (ours[i].int() - (stock * 255).round().int()).abs().max() <= 1


def test_output_is_uint8_at_output_size(tiny):
    images = Sampler(tiny, steps=1).generate(CAPTIONS[:2], [(0, 0), (0, 1)], [2.0, 2.0], k=3, seed=0,
                                             output_size=40)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 3, 40, 40)
    assert images.float().std() > 1  # not a constant (e.g. zero) image


def _cfg(tmp_path, **producer) -> Config:
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    cfg = Config()
    cfg.captions = dataclasses.replace(cfg.captions, path=str(path), shuffle=True)
    cfg.generator = GeneratorConfig(model="tiny", steps=2, dtype="fp32", guidance="mixed")
    cfg.producer = dataclasses.replace(
        cfg.producer, **{"images_per_caption": 2, "output_size": 32, "captions_per_call": 2,
                         "seed": 11, **producer})
    return cfg


def _groups(producer, calls: int) -> dict[tuple[int, int], torch.Tensor]:
    out = {}
    for _ in range(calls):
        for group in producer.next_groups():
            assert group.images_kchw.shape == (2, 3, 32, 32)
            out[(group.epoch, group.caption_id)] = group
    return out


@pytest.mark.slow
def test_group_is_the_same_alone_in_a_batch_on_any_shard_and_after_resume(tmp_path):
    cfg = _cfg(tmp_path)
    batched = build_producer(cfg, shard=0, num_shards=1, device="cpu")
    batched.start()
    first = _groups(batched, 1)
    state = batched.state_dict()
    rest = _groups(batched, 2)
    assert len({c for _, c in first} | {c for _, c in rest}) == len(CAPTIONS)

    resumed = build_producer(cfg, shard=0, num_shards=1, device="cpu")
    resumed.load_state_dict(state)
    resumed.start()
    again = _groups(resumed, 2)
    assert again.keys() == rest.keys()

    alone_cfg = _cfg(tmp_path, captions_per_call=1)
    alone = build_producer(alone_cfg, shard=1, num_shards=2, device="cpu", rank=5)
    alone.start()
    single = _groups(alone, 2)

    made = {**first, **rest}
    for key, group in list(again.items()) + list(single.items()):
        ref = made[key]
        assert group.caption == ref.caption and group.guidance_scale == ref.guidance_scale
        assert (group.images_kchw.int() - ref.images_kchw.int()).abs().max() <= 1
    assert {g.producer_rank for g in single.values()} == {5}
    for producer in (batched, resumed, alone):
        producer.close()


@pytest.mark.slow
def test_every_epoch_makes_new_images_and_resume_remakes_them(tmp_path):
    # Two captions, one call per epoch: epoch 1 must not repeat epoch 0's images, and a
    # producer resumed at epoch 1 remakes epoch 1's groups exactly.
    cfg = _cfg(tmp_path)
    cfg.captions.path = str(tmp_path / "two.txt")
    (tmp_path / "two.txt").write_text("a red fox\na blue car\n")
    cfg.generator = dataclasses.replace(cfg.generator, guidance="2.0")
    producer = build_producer(cfg, shard=0, num_shards=1, device="cpu")
    producer.start()
    epoch0 = {g.caption_id: g for g in producer.next_groups()}
    state = producer.state_dict()
    epoch1 = {g.caption_id: g for g in producer.next_groups()}
    assert {g.epoch for g in epoch0.values()} == {0} and {g.epoch for g in epoch1.values()} == {1}
    for caption_id in (0, 1):
        diff = (epoch0[caption_id].images_kchw.int() - epoch1[caption_id].images_kchw.int()).abs()
        assert diff.float().mean() > 5, "epoch 1 repeated epoch 0's images"

    resumed = build_producer(cfg, shard=0, num_shards=1, device="cpu")
    resumed.load_state_dict(state)
    resumed.start()
    again = {g.caption_id: g for g in resumed.next_groups()}
    for caption_id in (0, 1):
        assert again[caption_id].epoch == 1
        assert torch.equal(again[caption_id].images_kchw, epoch1[caption_id].images_kchw)
    producer.close()
    resumed.close()


def test_xformers_requested_without_it_warns(tmp_path):
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed")
    except ImportError:
        pass
    with pytest.warns(UserWarning, match="xformers is not installed"):
        build_components(GeneratorConfig(model="tiny", attention="xformers"), "cpu")


def test_a_checkpoint_that_cannot_be_loaded_names_the_key(tmp_path):
    from online_stablerep.producers.pipeline import build_components

    with pytest.raises(ValueError, match="generator.model="):
        build_components(GeneratorConfig(model=str(tmp_path / "no_such_model")), "cpu")


def test_tiny_autoencoder_from_a_folder_decodes_groups(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    # Two decoder blocks upsample 2x, the factor of the tiny architecture's own VAE.
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                    latent_channels=4).save_pretrained(tmp_path / "taesd")
    cfg = GeneratorConfig(model="tiny", steps=2, dtype="fp32", tiny_vae=str(tmp_path / "taesd"))
    components = build_components(cfg, "cpu")
    assert type(components.vae).__name__ == "AutoencoderTiny"
    images = Sampler(components, 2).generate(["a cat"], [(0, 0)], [2.0], k=2, seed=0, output_size=32)
    assert images.shape == (1, 2, 3, 32, 32) and images.dtype == torch.uint8
    assert images.float().std() > 0
    with pytest.raises(ValueError, match="generator.tiny_vae"):
        build_components(dataclasses.replace(cfg, tiny_vae=str(tmp_path / "missing")), "cpu")


@pytest.mark.slow
def test_compiled_producer_pads_the_last_call_and_matches_eager(tmp_path):
    # 5 captions, 2 a call, one epoch: calls of 2, 2 and 1 (padded to 2 for the fixed shapes).
    cfg = _cfg(tmp_path)
    cfg.train = dataclasses.replace(cfg.train, epochs=1)
    eager = build_producer(cfg, shard=0, num_shards=1, device="cpu")
    compiled_cfg = _cfg(tmp_path)
    compiled_cfg.train = dataclasses.replace(compiled_cfg.train, epochs=1)
    compiled_cfg.generator = dataclasses.replace(compiled_cfg.generator, compile=True)
    compiled = build_producer(compiled_cfg, shard=0, num_shards=1, device="cpu")
    for producer in (eager, compiled):
        producer.start()
    sizes = []
    while groups := compiled.next_groups():
        sizes.append(len(groups))
        reference = {g.caption_id: g for g in eager.next_groups()}
        for group in groups:
            diff = group.images_kchw.int() - reference[group.caption_id].images_kchw.int()
            assert diff.abs().max() <= 2
    assert sizes == [2, 2, 1] and eager.next_groups() == []


@pytest.mark.slow
def test_ddim_eta_zero_matches_diffusers_ddim_pipeline_on_the_toy_model():
    # The paper recipe's sampler (DDIM, eta 0) on the trained toy model against diffusers' own
    # StableDiffusionPipeline with DDIMScheduler, from the same seeded noise; tcd_eta stays at
    # its 0.3 default and must not reach DDIM.
    cfg = GeneratorConfig(model="toy", scheduler="ddim", steps=50, dtype="fp32")
    assert cfg.tcd_eta == 0.3 and cfg.ddim_eta == 0.0
    toy = build_components(cfg, "cpu")
    assert type(toy.scheduler_cls.from_config(toy.scheduler_config)).__name__ == "DDIMScheduler"
    k, caption_ids, captions = 2, [(0, 1), (0, 7)], ["a fractal of kind 1", "a fractal of kind 7"]
    ours = Sampler.from_config(toy, cfg).generate(captions, caption_ids, [2.0, 2.0], k=k, seed=3,
                                                  output_size=toy.resolution).flatten(0, 1)
    side = toy.resolution // toy.vae_scale_factor
    noise, _ = initial_noise(3, caption_ids, k, (4, side, side))
    stock = stock_pipeline(toy)(captions, num_images_per_prompt=k, num_inference_steps=50,
                                guidance_scale=2.0, latents=noise, eta=0.0,
                                output_type="pt").images
    diff = (ours.int() - (stock * 255).round().int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    # The comparison can fail: DDIM with eta > 0 adds fresh noise and leaves the reference.
    noisy = Sampler.from_config(toy, dataclasses.replace(cfg, ddim_eta=0.3)).generate(
        captions, caption_ids, [2.0, 2.0], k=k, seed=3, output_size=toy.resolution)
    assert (noisy.flatten(0, 1).int() - ours.int()).abs().max() > 10
