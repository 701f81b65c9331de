"""Generator recipes and their levers on the tiny architecture, each against its diffusers
reference: fused LoRA, distilled UNets, base-model first steps, interval guidance, TCD eta,
AutoencoderTiny decode, fused QKV; recipes through the real producer; bad inputs name the key."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import TCDScheduler, UNet2DConditionModel

from online_stablerep.config import ConfigError, load_config
from online_stablerep.config.recipes import RECIPES
from online_stablerep.config.schema import GeneratorConfig
from online_stablerep.producers import build_producer
from online_stablerep.producers.artefacts import save_random_lora, save_random_tiny_vae
from online_stablerep.producers.pipeline import build_components, stock_pipeline
from online_stablerep.producers.sampling import (
    Sampler,
    initial_noise,
    plan_steps,
    scheduler_eta,
)
from tests.helpers import save_random_unet

CAPTIONS = ["a red car on a wet street", "two dogs on a sofa"]
IDS = [(0, 3), (0, 8)]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, tiny_fp32_components):
    """Random-weight adapter, distilled UNets and tiny VAE for the tiny architecture, saved in
    diffusers' formats."""
    root = tmp_path_factory.mktemp("artefacts")
    base = tiny_fp32_components
    return {
        "lora": str(save_random_lora(base.unet, root / "lora", std=0.1)),
        "unet": str(save_random_unet(base.unet, root / "unet", seed=1)),
        "lcm_unet": str(save_random_unet(base.unet, root / "lcm_unet", seed=2,
                                         time_cond_proj_dim=32)),
        "tiny_vae": str(save_random_tiny_vae(root / "taesd", upsamplings=1, width=8)),
    }


def _tiny(**levers) -> GeneratorConfig:
    return GeneratorConfig(model="tiny", dtype="fp32", steps=3, **levers)


def _ours(cfg: GeneratorConfig, guidance: float = 2.0, k: int = 2) -> torch.Tensor:
    components = build_components(cfg, "cpu")
    sampler = Sampler.from_config(components, cfg)
    return sampler.generate(CAPTIONS, IDS, [guidance] * 2, k=k, seed=0,
                            output_size=components.resolution).flatten(0, 1)


def _stock(pipe, components, steps: int, guidance: float = 2.0, k: int = 2,
           **kwargs) -> torch.Tensor:
    side = components.resolution // components.vae_scale_factor
    noise, _ = initial_noise(0, IDS, k, (4, side, side))
    images = pipe(CAPTIONS, num_images_per_prompt=k, num_inference_steps=steps,
                  guidance_scale=guidance, latents=noise, output_type="pt", **kwargs).images
    return (images * 255).round().to(torch.uint8)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


# --- config -----------------------------------------------------------------------------------

def test_recipe_sets_its_levers_and_explicit_keys_win():
    cfg = load_config("sd15_vitb16", ["generator.recipe=fast"])
    assert cfg.generator.scheduler == "lcm" and cfg.generator.steps == 4
    assert cfg.generator.base_steps == 1 and cfg.generator.guidance_interval == [0.0, 0.25]
    assert cfg.generator.lora == RECIPES["fast"].levers["lora"]
    cfg = load_config("sd15_vitb16", ["generator.recipe=fast", "generator.steps=8",
                                      "generator.guidance_interval=[0,0.125]"])
    assert cfg.generator.steps == 8 and cfg.generator.scheduler == "lcm"
    paper = load_config("sd15_vitb16").generator
    assert (paper.recipe, paper.scheduler, paper.steps, paper.ddim_eta, paper.lora) == (
        "paper", "ddim", 50, 0.0, "")
    assert (paper.guidance, paper.resolution) == ("2.0", 512)
    dpm20 = load_config("sd15_vitb16", ["generator.recipe=dpm20"]).generator
    assert (dpm20.scheduler, dpm20.steps) == ("dpm++", 20)
    assert load_config(None).generator.recipe == ""


def test_ddim_runs_with_its_own_eta_never_tcds():
    cfg = load_config("sd15_vitb16")
    assert cfg.generator.tcd_eta == 0.3 and scheduler_eta(cfg.generator) == 0.0
    asked = load_config("sd15_vitb16", ["generator.ddim_eta=0.5"]).generator
    assert scheduler_eta(asked) == 0.5
    turbo = load_config("sd15_vitb16", ["generator.recipe=turbo"]).generator
    assert scheduler_eta(turbo) == 1.0
    assert scheduler_eta(load_config("sd15_vitb16", ["generator.recipe=dpm20"]).generator) == 0.0
    with pytest.raises(ConfigError, match=r"generator\.ddim_eta"):
        load_config("sd15_vitb16", ["generator.recipe=dpm20", "generator.ddim_eta=0.5"])


@pytest.mark.parametrize("override, key", [
    ("generator.recipe=quick", "generator.recipe"),
    ("generator.scheduler=heun", "generator.scheduler"),
    ("generator.timestep_spacing=odd", "generator.timestep_spacing"),
    ("generator.scheduler=lcm generator.timestep_spacing=trailing", "generator.timestep_spacing"),
    ("generator.tcd_eta=1.5", "generator.tcd_eta"),
    ("generator.ddim_eta=-0.1", "generator.ddim_eta"),
    ("generator.compile_mode=fastest", "generator.compile_mode"),
    ("generator.base_steps=1", "generator.base_steps"),
    ("generator.guidance_interval=[0.5,0.2]", "generator.guidance_interval"),
    ("generator.guidance_interval=[0.5]", "generator.guidance_interval"),
    ("generator.deep_cache_every=0", "generator.deep_cache_every"),
    ("generator.lora=/no/such/adapter", "generator.lora"),
    ("generator.lora_weight_name=x.safetensors", "generator.lora_weight_name"),
    ("generator.unet=./no_such_unet", "generator.unet"),
    ("generator.tiny_vae=/no/such/taesd", "generator.tiny_vae"),
    ("generator.lora_scale=0", "generator.lora_scale"),
])
def test_bad_lever_fails_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("cpu_demo", override.split())


def test_unloadable_adapter_fails_at_start_naming_the_key(tmp_path, artefacts):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="generator.lora="):
        build_components(_tiny(lora=str(tmp_path / "empty")), "cpu")
    # An adapter made for another architecture does not fit the UNet.
    sd_like = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                   cross_attention_dim=48, attention_head_dim=8)
    save_random_lora(sd_like, tmp_path / "other")
    with pytest.raises(ValueError, match="generator.lora="):
        build_components(_tiny(lora=str(tmp_path / "other")), "cpu")
    with pytest.raises(ValueError, match="generator.unet="):
        build_components(_tiny(unet=str(tmp_path / "empty")), "cpu")
    with pytest.raises(ValueError, match="generator.tiny_vae="):
        build_components(_tiny(tiny_vae=str(tmp_path / "empty")), "cpu")


# --- levers against their references ---------------------------------------------------------

@pytest.mark.slow
def test_fused_lora_matches_the_pipeline_with_the_adapter_loaded(artefacts):
    ours = _ours(_tiny(lora=artefacts["lora"]))
    plain = build_components(_tiny(), "cpu")
    pipe = stock_pipeline(plain)
    pipe.load_lora_weights(artefacts["lora"])  # unfused: the adapter layers run at each call
    stock = _stock(pipe, plain, steps=3)
    assert _max_diff(ours, stock) <= 1
    assert _max_diff(ours, _ours(_tiny())) > 5, "the adapter changed nothing"


# LCM re-noises between steps from its generators (ours: one per image; the pipeline's: its
# own), so the LCM comparison takes one step, where no noise is added.
@pytest.mark.slow
@pytest.mark.parametrize("which, scheduler, steps", [("unet", "dpm++", 3), ("lcm_unet", "lcm", 1)])
def test_distilled_unet_matches_the_pipeline_with_that_unet(artefacts, which, scheduler, steps):
    cfg = dataclasses.replace(_tiny(unet=artefacts[which], scheduler=scheduler), steps=steps)
    ours = _ours(cfg)
    components = build_components(cfg, "cpu")
    # With time_cond_proj_dim the pipeline, like ours, embeds guidance instead of a second pass.
    stock = _stock(stock_pipeline(components), components, steps=steps)
    assert _max_diff(ours, stock) <= 1


@pytest.mark.slow
def test_base_steps_hand_over_from_base_model_to_distilled(artefacts):
    distilled = _tiny(lora=artefacts["lora"], scheduler="lcm")
    only_distilled = _ours(distilled)
    assert torch.equal(_ours(dataclasses.replace(distilled, base_steps=0)), only_distilled)
    # Every step on the base model: the plain model with the same scheduler.
    all_base = _ours(dataclasses.replace(distilled, base_steps=3))
    assert _max_diff(all_base, _ours(_tiny(scheduler="lcm"))) <= 1
    mixed = _ours(dataclasses.replace(distilled, base_steps=1))
    # (Random weights: the images differ little, but they must differ.)
    assert not torch.equal(mixed, only_distilled) and not torch.equal(mixed, all_base)


@pytest.mark.slow
def test_interval_guidance_covering_every_step_is_full_guidance():
    full = _ours(_tiny())
    assert torch.equal(_ours(_tiny(guidance_interval=[0.0, 1.0])), full)
    # An empty interval is no guidance at all: the guidance-1 output.
    assert torch.equal(_ours(_tiny(guidance_interval=[0.0, 0.0])), _ours(_tiny(), guidance=1.0))
    first_only = _ours(_tiny(guidance_interval=[0.0, 0.34]))
    assert not torch.equal(first_only, full)
    assert not torch.equal(first_only, _ours(_tiny(), guidance=1.0))


def test_step_plan_follows_interval_base_steps_and_cache():
    guided = [k.guided for k in plan_steps(4, guidance_interval=(0.25, 0.75))]
    assert guided == [False, True, True, False]
    fast = plan_steps(4, (0.0, 0.25), base_steps=1)
    assert [(k.base, k.guided) for k in fast] == [(True, True)] + [(False, False)] * 3
    # An LCM UNet embeds guidance: its steps are never guided; no guidance > 1: none is.
    assert not any(k.guided for k in plan_steps(3, distilled_embeds_guidance=True))
    assert not any(k.guided for k in plan_steps(3, guidance=False))
    # DeepCache: full every 3rd step, and again whenever the UNet or the rows change.
    assert [k.full for k in plan_steps(7, deep_cache_every=3)] == [1, 0, 0, 1, 0, 0, 1]
    assert [k.full for k in plan_steps(4, (0.0, 0.5), deep_cache_every=4)] == [1, 0, 1, 0]


@pytest.mark.slow
def test_tiny_decoder_matches_diffusers_autoencoder_tiny(artefacts):
    cfg = _tiny(tiny_vae=artefacts["tiny_vae"])
    components = build_components(cfg, "cpu")
    assert type(components.vae).__name__ == "AutoencoderTiny"
    stock = _stock(stock_pipeline(components), components, steps=3)
    assert _max_diff(_ours(cfg), stock) <= 1


@pytest.mark.slow
def test_tcd_eta_matches_the_pipeline_and_adds_noise():
    cfg = _tiny(scheduler="tcd", tcd_eta=0.0)
    components = build_components(cfg, "cpu")
    stock = _stock(stock_pipeline(components), components, steps=3, eta=0.0)
    assert _max_diff(_ours(cfg), stock) <= 1
    assert _max_diff(_ours(dataclasses.replace(cfg, tcd_eta=1.0)), _ours(cfg)) > 1


def test_trailing_timesteps_reach_the_scheduler():
    components = build_components(_tiny(scheduler="euler", timestep_spacing="trailing"), "cpu")
    sampler = Sampler(components, steps=1)
    sampler.scheduler.set_timesteps(1)
    assert int(sampler.scheduler.timesteps[0]) == 999


@pytest.mark.slow
def test_fused_qkv_matches_separate_projections():
    assert _max_diff(_ours(_tiny(fuse_qkv=True)), _ours(_tiny())) <= 1


# --- recipes through the real producer --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_generates_a_group_through_the_producer(tmp_path, artefacts, recipe):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    # Compile is left to tests/test_diffusion.py (slow on a CPU); the tiny architecture takes
    # the adapter and VAE made for it.
    overrides = [f"generator.recipe={recipe}", "generator.compile=false",
                 f"captions.path={captions}", "producer.captions_per_call=2",
                 "producer.images_per_caption=2", "producer.output_size=32",
                 "batch.views_per_caption=2", "generator.model=tiny"]
    if RECIPES[recipe].levers["lora"]:
        overrides += [f"generator.lora={artefacts['lora']}", "generator.lora_weight_name=''"]
    if RECIPES[recipe].levers["tiny_vae"]:
        overrides.append(f"generator.tiny_vae={artefacts['tiny_vae']}")
    cfg = load_config("cpu_demo", overrides)
    assert cfg.generator.steps == RECIPES[recipe].levers["steps"]
    producer = build_producer(cfg, shard=0, num_shards=1, device="cpu")
    producer.start()
    groups = producer.next_groups()
    producer.close()
    assert len(groups) == 2
    for group in groups:
        assert group.images_kchw.shape == (2, 3, 32, 32)
        assert group.images_kchw.dtype == torch.uint8 and group.images_kchw.float().std() > 1


def test_tcd_scheduler_is_registered():
    assert build_components(_tiny(scheduler="tcd"), "cpu").scheduler_cls is TCDScheduler
