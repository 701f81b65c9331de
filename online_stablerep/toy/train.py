"""Train the toy text-to-image model: autoencoder, then UNet and text encoder, with an EMA.

Four phases, one process, seeded:
1. Render a bank of opacity maps of every toy category (training image indices only).
2. Train the category classifier on colourised renders with brightness, contrast, blur and noise
   shifts (so washed-out or soft samples are judged by shape, not by photometry).
3. Train the AutoencoderKL (L1 + MSE + a small KL), then set its latent scaling factor.
4. Train the UNet and text encoder jointly on v-prediction with min-SNR weighting and an EMA of
   the weights; every `eval_every` steps the EMA model samples each category through the
   project's own Sampler and the classifier scores it, and the folder is saved.

The saved folder is a standard diffusers StableDiffusionPipeline folder (fp16 UNet and VAE, fp32
text encoder, model_index.json, tokenizer, scheduler) plus `classifier.safetensors` and
`toy_training.json` (loss curve, sample accuracy, command, seed, wall time).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from safetensors.torch import save_file
from tqdm import tqdm

from online_stablerep.atomic import atomic_path
from online_stablerep.fractals import HELD_OUT_INDEX_OFFSET
from online_stablerep.producers.pipeline import Components
from online_stablerep.producers.sampling import Sampler
from online_stablerep.producers.tokenizer import build_clip_tokenizer
from online_stablerep.toy.models import (
    TOY_SCHEDULER_CONFIG,
    CategoryClassifier,
    build_text_encoder,
    build_unet,
    build_vae,
    classify,
)
from online_stablerep.toy.world import (
    COLOURS,
    TOY_CATEGORIES,
    TOY_RESOLUTION,
    caption,
    colourise,
    render_bank,
)

_COLOUR_NAMES = list(COLOURS)


@dataclass
class ToyTrainConfig:
    """Settings of one toy-model training run."""

    # Output folder (replaced at every save).
    out: Path
    # UNet/text-encoder steps.
    steps: int = 4000
    seed: int = 0
    # Images per UNet step.
    batch_size: int = 48
    # AdamW learning rate of the UNet and text encoder (constant after a 100-step warm-up).
    lr: float = 1e-3
    # Autoencoder steps and batch.
    vae_steps: int = 400
    vae_batch: int = 32
    # Classifier steps (batch 64).
    classifier_steps: int = 300
    # Training renders per category in the bank.
    bank_per_category: int = 1500
    # EMA decay of the UNet and text encoder weights.
    ema_decay: float = 0.999
    # Sample, score and save every this many steps.
    eval_every: int = 250
    # Sampler steps and guidance of the in-training evaluation.
    eval_sampler_steps: int = 8
    eval_guidance: float = 2.0
    # Stop (and save) after this many minutes of wall time; 0 for no limit.
    max_minutes: float = 0.0
    # Fraction of training renders coloured by a colour word, and of captions dropped (guidance).
    p_colour: float = 0.5
    p_uncond: float = 0.1
    # The command line that started the run, recorded in toy_training.json.
    command: str = ""


def _photometric(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, blur and noise shifts of (B, 3, H, W) images in [0, 1]."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=g))

    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * u(0.4, 1.4)
    x = x * u(0.6, 1.3) + u(-0.2, 0.2)
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = torch.where(torch.rand(b, 1, 1, 1, generator=g) < 0.3, blurred, x)
    x = x + torch.randn(x.shape, generator=g) * u(0.0, 0.06)
    return x.clamp(0, 1)


def train_classifier(bank: torch.Tensor, held_out: torch.Tensor, steps: int, seed: int
                     ) -> tuple[CategoryClassifier, float]:
    """The category classifier (batch 64) and its top-1 on held-out renders (any colour,
    unshifted)."""
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    model = CategoryClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    c, n = bank.shape[:2]
    model.train()
    for _ in tqdm(range(steps), desc="classifier", mininterval=10):
        labels = torch.randint(c, (64,), generator=g)
        alpha = bank[labels, torch.randint(n, (64,), generator=g)]
        x = _photometric(colourise(alpha, [None] * 64, g), g)
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    labels = torch.arange(c).repeat_interleave(held_out.shape[1])
    images = colourise(held_out.flatten(0, 1), [None] * labels.numel(), g)
    pred = classify(model, (images * 255).round().to(torch.uint8))
    return model, float((pred == labels).float().mean())


def train_vae(bank: torch.Tensor, steps: int, batch: int, seed: int) -> tuple[Any, float]:
    """The autoencoder with its scaling factor set, and its final reconstruction MSE."""
    g = torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed + 2)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(steps, 1))
    c, n = bank.shape[:2]
    vae.train()
    mse = float("nan")
    for _ in (bar := tqdm(range(steps), desc="autoencoder", mininterval=10)):
        alpha = bank[torch.randint(c, (batch,), generator=g), torch.randint(n, (batch,), generator=g)]
        x = colourise(alpha, [None] * batch, g) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        mse_t = F.mse_loss(recon, x)
        loss = F.l1_loss(recon, x) + mse_t + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        mse = float(mse_t.detach())
        bar.set_postfix(mse=f"{mse:.4f}", refresh=False)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        alpha = bank[torch.randint(c, (512,), generator=g), torch.randint(n, (512,), generator=g)]
        x = colourise(alpha, [None] * 512, g) * 2 - 1
        std = float(vae.encode(x).latent_dist.sample(generator=g).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, mse


def colour_plan(count: int, p_colour: float, g: torch.Generator) -> list[str | None]:
    """A colour word (or None: any hue) for each of `count` bank images."""
    u = torch.rand(count, generator=g).tolist()
    pick = torch.randint(len(_COLOUR_NAMES), (count,), generator=g).tolist()
    return [_COLOUR_NAMES[k] if p < p_colour else None for p, k in zip(u, pick, strict=True)]


def draw_captions(labels: list[int], colours: list[str | None], p_uncond: float,
                   g: torch.Generator) -> list[str]:
    """Training captions: an image of a named colour is captioned with its colour word three
    times in four (the plain caption means any colour); a few captions are dropped (guidance)."""
    u = torch.rand(len(labels), 2, generator=g).tolist()
    return [
        "" if p_drop < p_uncond else caption(label, colour if p_word < 0.75 else None)
        for label, colour, (p_word, p_drop) in zip(labels, colours, u, strict=True)
    ]


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def sample_accuracy(components: Components, classifier: CategoryClassifier, steps: int,
                    guidance: float, per_category: int = 4, seed: int = 1234) -> float:
    """Classifier top-1 against the caption's category of `per_category` samples of every
    "a fractal of kind c" caption, made by the project's Sampler."""
    sampler = Sampler(components, steps)
    captions = [caption(c) for c in range(TOY_CATEGORIES)]
    images = sampler.generate(captions, [(0, c) for c in range(TOY_CATEGORIES)],
                              [guidance] * TOY_CATEGORIES, k=per_category, seed=seed,
                              output_size=TOY_RESOLUTION)
    pred = classify(classifier, images.flatten(0, 1))
    labels = torch.arange(TOY_CATEGORIES).repeat_interleave(per_category)
    return float((pred == labels).float().mean())


def save_folder(out: Path, unet: torch.nn.Module, vae: torch.nn.Module,
                text_encoder: torch.nn.Module, tokenizer: Any, classifier: CategoryClassifier,
                record: dict[str, Any]) -> None:
    """Write the diffusers folder (fp16 UNet and VAE, fp32 text encoder) and the side files,
    replacing `out` whole.

    The text encoder stays fp32: transformers loads a model in its stored dtype while diffusers
    loads the UNet and VAE in fp32, so a plain `DiffusionPipeline.from_pretrained(out)` with an
    fp16 text encoder fails at its first call on a CPU (Half and Float in one matmul).
    """
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(), text_encoder=copy.deepcopy(text_encoder).float(),
        tokenizer=tokenizer, unet=copy.deepcopy(unet).half(),
        scheduler=DPMSolverMultistepScheduler.from_config(TOY_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with atomic_path(out, ".partial") as partial:
        shutil.rmtree(partial, ignore_errors=True)
        pipe.save_pretrained(partial, safe_serialization=True)
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous()
                   for k, v in classifier.state_dict().items()},
                  partial / "classifier.safetensors")
        (partial / "toy_training.json").write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)


def train_toy_generator(cfg: ToyTrainConfig) -> dict[str, Any]:
    """Run all phases and save the folder; returns the training record."""
    t_start = time.perf_counter()
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    record: dict[str, Any] = {
        "command": cfg.command, "settings": {k: str(v) if isinstance(v, Path) else v
                                             for k, v in asdict(cfg).items()},
        "loss_curve": [], "sample_accuracy": [],
    }
    # 1. Training renders; held-out renders (probe-range indices) only for the classifier score.
    bank = render_bank(cfg.bank_per_category)
    held_out = render_bank(20, first_index=HELD_OUT_INDEX_OFFSET + 50_000)
    # 2. Classifier.
    classifier, acc = train_classifier(bank, held_out, cfg.classifier_steps, cfg.seed)
    record["classifier_top1_held_out"] = acc
    print(f"classifier: held-out top-1 {acc:.3f}", flush=True)
    # 3. Autoencoder; the classifier on its reconstructions says what the decoder loses.
    vae, mse = train_vae(bank, cfg.vae_steps, cfg.vae_batch, cfg.seed)
    with torch.no_grad():
        real = colourise(held_out.flatten(0, 1), [None] * held_out[:, :, 0].numel(), g)
        recon = vae.decode(vae.encode(real * 2 - 1).latent_dist.mode()).sample
        recon_u8 = ((recon / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.arange(TOY_CATEGORIES).repeat_interleave(held_out.shape[1])
    record["vae_mse"] = mse
    record["classifier_top1_vae_reconstructions"] = float(
        (classify(classifier, recon_u8) == labels).float().mean())
    print(f"autoencoder: mse {mse:.4f}, classifier on reconstructions "
          f"{record['classifier_top1_vae_reconstructions']:.3f}", flush=True)
    # 4. UNet + text encoder.
    tokenizer = build_clip_tokenizer()
    unet, text_encoder = build_unet(), build_text_encoder()
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    noise_schedule = DDPMScheduler.from_config(TOY_SCHEDULER_CONFIG)
    alphas_cumprod = noise_schedule.alphas_cumprod
    token_cache: dict[str, torch.Tensor] = {}
    components = Components(
        unet=ema_unet, vae=vae, text_encoder=ema_text, tokenizer=tokenizer,
        scheduler_cls=DPMSolverMultistepScheduler, scheduler_config=TOY_SCHEDULER_CONFIG,
        device=torch.device("cpu"), dtype=torch.float32, vae_scale_factor=2,
        resolution=TOY_RESOLUTION,
    )
    # Latents of the whole bank, encoded once: each render with one colouring, a colour word
    # for half of them.
    c, n = bank.shape[:2]
    colours = colour_plan(c * n, cfg.p_colour, g)
    with torch.no_grad():
        flat = bank.flatten(0, 1)
        latent_bank = torch.cat([
            vae.encode(colourise(flat[lo:lo + 256], colours[lo:lo + 256], g) * 2 - 1
                       ).latent_dist.mode() * vae.config.scaling_factor
            for lo in range(0, c * n, 256)
        ])
    step, running, stopped = 0, [], "steps"
    bar = tqdm(total=cfg.steps, desc="unet", mininterval=10)
    unet.train()
    text_encoder.train()
    while step < cfg.steps:
        index = torch.randint(c * n, (cfg.batch_size,), generator=g)
        latents = latent_bank[index]
        captions = draw_captions((index // n).tolist(), [colours[i] for i in index.tolist()],
                                  cfg.p_uncond, g)
        for text in set(captions) - token_cache.keys():
            token_cache[text] = tokenizer(text, padding="max_length", truncation=True,
                                          max_length=tokenizer.model_max_length,
                                          return_tensors="pt").input_ids[0]
        ids = torch.stack([token_cache[t] for t in captions])
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (cfg.batch_size,),
                          generator=g)
        noise = torch.randn(latents.shape, generator=g)
        noisy = noise_schedule.add_noise(latents, noise, t)
        target = noise_schedule.get_velocity(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        # Min-SNR-5 weighting for v-prediction: no timestep dominates the gradient.
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = snr.clamp(max=5.0) / (snr + 1)
        loss = (weight * (pred - target).square().mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        running.append(float(loss))
        bar.update(1)
        if step % 10 == 0:
            record["loss_curve"].append([step, sum(running) / len(running)])
            bar.set_postfix(loss=f"{record['loss_curve'][-1][1]:.4f}", refresh=False)
            running = []
        out_of_time = time.perf_counter() > deadline
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            acc = sample_accuracy(components, classifier, cfg.eval_sampler_steps,
                                  cfg.eval_guidance)
            record["sample_accuracy"].append([step, acc])
            record.update(steps_done=step, wall_s=round(time.perf_counter() - t_start, 1),
                          stopped_by=stopped if not out_of_time else "max_minutes")
            tqdm.write(f"step {step}: loss {record['loss_curve'][-1][1] if record['loss_curve'] else float('nan'):.4f}, "
                       f"sample accuracy {acc:.3f} ({record['wall_s']:.0f}s)")
            save_folder(cfg.out, ema_unet, vae, ema_text, tokenizer, classifier, record)
        if out_of_time:
            break
    bar.close()
    return record
