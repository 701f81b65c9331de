"""Distil the toy model into a few-step student: latent consistency distillation as a LoRA
(LCM-LoRA, arXiv 2311.05556; the consistency loss of LCM, arXiv 2310.04378).

The student is the teacher's UNet with a peft LoRA on its attention, feed-forward, projection,
ResNet-convolution, resampling and time-embedding layers (LCM-LoRA's target list). Each step:
1. a real render's latent (the toy VAE's encoding) is noised to a timestep t_{n+k} of a
   50-step DDIM grid over the 1,000 training timesteps (k = 20, LCMScheduler's own grid);
2. the frozen teacher, with classifier-free guidance at a scale drawn from [guidance_min,
   guidance_max], takes one DDIM step from t_{n+k} to t_n;
3. the student's consistency function f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t) at t_{n+k}
   is pulled (pseudo-Huber loss) towards the target network's output at the teacher's t_n point:
   LCM's EMA of the student's LoRA (decay 0.95). LCM-LoRA's simplification (the online student
   as its own target) collapsed here at lr 1e-3 within 100 steps (sample accuracy 0.125).
The student bakes guidance in (a LoRA cannot add LCM's guidance-embedding input), so it samples
with guidance 1: one UNet pass per step, through diffusers' LCMScheduler.

The output folder holds `pytorch_lora_weights.safetensors` in diffusers' format (loaded by
`pipe.load_lora_weights(folder)`, as a released LCM-LoRA is) and `toy_distillation.json` (the
command, seed, wall time, loss curve and sample accuracy during training).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm import tqdm

from online_stablerep.producers.pipeline import Components
from online_stablerep.producers.sampling import Sampler
from online_stablerep.producers.shipped import SHIPPED_MODELS
from online_stablerep.toy.models import load_classifier
from online_stablerep.toy.train import colour_plan, draw_captions, sample_accuracy
from online_stablerep.toy.world import TOY_RESOLUTION, colourise, corpus, render_bank

# LCM-LoRA's target layers (diffusers' train_lcm_distill_lora_sd_wds.py): on a UNet this small
# the attention layers alone are too few to reshape the sampler.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                "upsamplers.0.conv", "time_emb_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"
RECORD_FILE = "toy_distillation.json"


@dataclass
class DistillConfig:
    """Settings of one distillation run."""

    # Output folder of the adapter (replaced at every save).
    out: Path
    # Teacher: a toy-model diffusers folder.
    teacher: Path = SHIPPED_MODELS["toy"]
    steps: int = 3000
    seed: int = 0
    # Latents per step.
    batch_size: int = 16
    # AdamW learning rate of the LoRA (constant after a 50-step warm-up).
    lr: float = 2e-4
    # EMA decay of the target network's LoRA (LCM's 0.95).
    target_decay: float = 0.95
    # LoRA rank (alpha = rank: scale 1).
    rank: int = 16
    # Teacher guidance scales drawn uniformly per latent (the CPU demo samples at 2 and 3).
    guidance_min: float = 2.0
    guidance_max: float = 3.0
    # DDIM grid of the teacher's solver step (LCMScheduler's original_inference_steps).
    ddim_steps: int = 50
    # Pseudo-Huber constant of the consistency loss.
    huber_c: float = 1e-3
    # Training renders per category (encoded once by the teacher's VAE).
    bank_per_category: int = 800
    # Score samples and save every this many steps.
    eval_every: int = 100
    # Stop (and save) after this many minutes of wall time; 0 for no limit.
    max_minutes: float = 0.0
    # The command line that started the run, recorded in toy_distillation.json.
    command: str = ""


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip, c_out (as LCMScheduler computes them): f(x, 0) = x at the boundary."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def _x0_eps(v: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latent and noise from a v-prediction at a point x = alpha x0 + sigma eps."""
    return alpha * x - sigma * v, alpha * v + sigma * x


def save_adapter(out: Path, unet: torch.nn.Module, record: dict[str, Any]) -> None:
    """Write the LoRA (fp16, diffusers' format) and the record, replacing `out` whole."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # peft's key names, as diffusers' LoRA trainers save them: diffusers' older naming covers
    # attention layers only, and a file mixing the two loads without its attention LoRA.
    layers = {k: v.detach().half().contiguous()
              for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(str(partial), unet_lora_layers=layers,
                                              safe_serialization=True)
    (partial / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def _latent_bank(pipe: StableDiffusionPipeline, per_category: int, g: torch.Generator
                 ) -> tuple[torch.Tensor, list[int], list[str | None]]:
    """Scaled VAE latents of colourised training renders, their categories and colour words."""
    bank = render_bank(per_category)
    c, n = bank.shape[:2]
    colours = colour_plan(c * n, 0.5, g)
    flat = bank.flatten(0, 1)
    with torch.no_grad():
        latents = torch.cat([
            pipe.vae.encode(colourise(flat[lo:lo + 256], colours[lo:lo + 256], g) * 2 - 1
                            ).latent_dist.mode() * pipe.vae.config.scaling_factor
            for lo in range(0, c * n, 256)
        ])
    return latents, (torch.arange(c * n) // n).tolist(), colours


def distill_toy_generator(cfg: DistillConfig) -> dict[str, Any]:
    """Train the LoRA and save it; returns the training record."""
    t_start = time.perf_counter()
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    record: dict[str, Any] = {
        "command": cfg.command, "settings": {k: str(v) if isinstance(v, Path) else v
                                             for k, v in asdict(cfg).items()},
        "loss_curve": [], "sample_accuracy": [], "one_step_rms_to_teacher_ode": [],
    }
    pipe = StableDiffusionPipeline.from_pretrained(cfg.teacher, torch_dtype=torch.float32,
                                                   safety_checker=None)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    teacher = pipe.unet
    student = copy.deepcopy(teacher)
    student.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                   target_modules=LORA_TARGETS))
    params = [p for p in student.parameters() if p.requires_grad]
    target_net = copy.deepcopy(student).requires_grad_(False)
    ema_pairs = [(t, s) for (name, t), s in zip(target_net.named_parameters(),
                                                 student.parameters(), strict=True)
                 if "lora_" in name]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    classifier = load_classifier(cfg.teacher)
    # Every caption the student will see is encoded once: the text encoder is frozen.
    with torch.no_grad():
        texts = ["", *corpus()]
        tokens = pipe.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
        embeds = dict(zip(texts, pipe.text_encoder(tokens.input_ids)[0], strict=True))
    latents_all, labels, colours = _latent_bank(pipe, cfg.bank_per_category, g)
    noise_schedule = LCMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_schedule.alphas_cumprod
    k = noise_schedule.config.num_train_timesteps // cfg.ddim_steps
    ddim_timesteps = torch.arange(1, cfg.ddim_steps + 1) * k - 1  # LCMScheduler's grid
    components = Components(
        unet=student, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler_cls=LCMScheduler, scheduler_config=dict(pipe.scheduler.config),
        device=torch.device("cpu"), dtype=torch.float32, vae_scale_factor=2,
        resolution=TOY_RESOLUTION,
    )

    # The consistency function's aim: from noise, one step to where the guided teacher's ODE
    # ends. Its distance to that end (latent RMS) says how far the student has come; class
    # accuracy alone does not (the teacher's own one-step x0 prediction is already recognisable).
    probe_captions = corpus(False) * 2
    probe_noise = torch.randn(len(probe_captions), 4, 16, 16, generator=g)
    probe_cond = torch.stack([embeds[t] for t in probe_captions])
    teacher_components = dataclasses.replace(
        components, unet=teacher, scheduler_cls=DPMSolverMultistepScheduler)
    mid_guidance = torch.full((len(probe_captions),), (cfg.guidance_min + cfg.guidance_max) / 2)
    ode_end = Sampler(teacher_components, 20).denoise(probe_noise, probe_cond, None,
                                                      mid_guidance, [])

    def evaluate(step: int) -> None:
        student.eval()
        accs = {f"lcm{s}": sample_accuracy(components, classifier, s, 1.0) for s in (4, 1)}
        one_step = Sampler(components, 1).denoise(probe_noise, probe_cond, None,
                                                  torch.ones(len(probe_captions)), [])
        student.train()
        rms = float((one_step - ode_end).square().mean().sqrt())
        record["sample_accuracy"].append([step, accs])
        record["one_step_rms_to_teacher_ode"].append([step, rms])
        record.update(steps_done=step, wall_s=round(time.perf_counter() - t_start, 1))
        tqdm.write(f"step {step}: sample accuracy {accs}, 1-step RMS to the teacher's ODE end "
                   f"{rms:.4f} ({record['wall_s']:.0f}s)")
        save_adapter(cfg.out, student, record)

    record["stopped_by"] = "steps"
    evaluate(0)
    step, running = 0, []
    bar = tqdm(total=cfg.steps, desc="distill", mininterval=10)
    student.train()
    while step < cfg.steps:
        index = torch.randint(latents_all.shape[0], (cfg.batch_size,), generator=g)
        x0 = latents_all[index]
        captions = draw_captions([labels[i] for i in index.tolist()],
                                 [colours[i] for i in index.tolist()], 0.0, g)
        cond = torch.stack([embeds[t] for t in captions])
        uncond = embeds[""].expand_as(cond)
        n = torch.randint(cfg.ddim_steps, (cfg.batch_size,), generator=g)
        t, t_prev = ddim_timesteps[n], (ddim_timesteps[n] - k).clamp(min=0)
        a_t, s_t = (alphas_cumprod[t].sqrt().view(-1, 1, 1, 1),
                    (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1))
        a_p, s_p = (alphas_cumprod[t_prev].sqrt().view(-1, 1, 1, 1),
                    (1 - alphas_cumprod[t_prev]).sqrt().view(-1, 1, 1, 1))
        x_t = a_t * x0 + s_t * torch.randn(x0.shape, generator=g)
        # Student's consistency function at t_{n+k}.
        c_skip, c_out = boundary_scalings(t)
        pred = c_skip * x_t + c_out * _x0_eps(student(x_t, t, cond).sample, x_t, a_t, s_t)[0]
        with torch.no_grad():
            # Teacher: one guided DDIM step t_{n+k} -> t_n (guidance on x0 and on eps).
            v_u, v_c = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                               torch.cat([uncond, cond])).sample.chunk(2)
            (x0_u, eps_u), (x0_c, eps_c) = _x0_eps(v_u, x_t, a_t, s_t), _x0_eps(v_c, x_t, a_t, s_t)
            w = cfg.guidance_min - 1 + (cfg.guidance_max - cfg.guidance_min) * torch.rand(
                cfg.batch_size, 1, 1, 1, generator=g)
            x_prev = (a_p * (x0_c + w * (x0_c - x0_u)) + s_p * (eps_c + w * (eps_c - eps_u)))
            # Target: the target network's consistency function at t_n.
            c_skip_p, c_out_p = boundary_scalings(t_prev)
            target = c_skip_p * x_prev + c_out_p * _x0_eps(
                target_net(x_prev, t_prev, cond).sample, x_prev, a_p, s_p)[0]
        loss = ((pred - target).square() + cfg.huber_c**2).sqrt().sub(cfg.huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for t_param, s_param in ema_pairs:
                t_param.lerp_(s_param, 1.0 - cfg.target_decay)
        step += 1
        running.append(loss.item())
        bar.update(1)
        out_of_time = time.perf_counter() > deadline
        if out_of_time:
            record["stopped_by"] = "max_minutes"
        if step % 10 == 0 or step == cfg.steps or out_of_time:
            record["loss_curve"].append([step, sum(running) / len(running)])
            bar.set_postfix(loss=f"{record['loss_curve'][-1][1]:.4f}", refresh=False)
            running = []
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            evaluate(step)
        if out_of_time:
            break
    bar.close()
    return record
