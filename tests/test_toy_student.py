"""The toy model's few-step student: the distillation command, the shipped LCM-LoRA, the `fast`
recipe on the toy model, and the shipped folders under diffusers' own plain calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler
from safetensors.torch import load_file

from online_stablerep.cli import main
from online_stablerep.config import load_config
from online_stablerep.producers.diffusion import DiffusionProducer
from online_stablerep.producers.shipped import SHIPPED_ADAPTERS, SHIPPED_MODELS
from online_stablerep.toy.distill import LORA_FILE, RECORD_FILE
from online_stablerep.toy.models import classify, load_classifier
from online_stablerep.toy.world import TOY_CATEGORIES, parse_caption
from tests.helpers import read_logs, start_ranks, wait_all

ROOT = Path(__file__).resolve().parents[1]
TOY_DIR = SHIPPED_MODELS["toy"]
STUDENT_DIR = SHIPPED_ADAPTERS["toy-lcm-lora"]


def test_fast_recipe_on_the_toy_model_names_the_shipped_student():
    g = load_config("cpu_demo", ["generator.recipe=fast"]).generator
    assert (g.lora, g.tiny_vae, g.scheduler, g.steps, g.compile) == ("toy-lcm-lora", "", "lcm",
                                                                     4, False)
    # Explicit keys still win over the recipe; another model keeps the released adapter.
    assert load_config("cpu_demo", ["generator.recipe=fast",
                                    "generator.base_steps=0"]).generator.base_steps == 0
    other = load_config("cpu_demo", ["generator.recipe=fast", "generator.model=tiny"]).generator
    assert other.lora == "latent-consistency/lcm-lora-sdv1-5"


@pytest.mark.slow
def test_shipped_teacher_and_student_run_with_the_plain_diffusers_calls():
    """What a user types: no dtype argument (an fp16 text encoder beside the fp32 UNet failed
    here with "mat1 and mat2 must have the same dtype")."""
    pipe = DiffusionPipeline.from_pretrained(str(TOY_DIR))
    pipe.set_progress_bar_config(disable=True)
    teacher = pipe("a fractal of kind 3", num_inference_steps=1, output_type="pt").images
    pipe.load_lora_weights(str(STUDENT_DIR))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    student = pipe("a fractal of kind 3", num_inference_steps=1, guidance_scale=1.0,
                   output_type="pt").images
    assert teacher.shape == student.shape == (1, 3, 32, 32)
    assert torch.isfinite(student).all() and float(student.std()) > 0.05


@pytest.mark.slow
def test_distill_command_writes_an_adapter_diffusers_loads(tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill-toy-generator", "--out", str(out), "--steps", "2", "--bank", "2",
                 "--batch-size", "4", "--eval-every", "1", "--rank", "2"]) == 0
    assert "saved" in capsys.readouterr().out
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["command"].startswith("online-stablerep distill-toy-generator")
    assert record["steps_done"] == 2 and [s for s, _ in record["sample_accuracy"]] == [0, 1, 2]
    assert [s for s, _ in record["loss_curve"]] == [2]
    pipe = DiffusionPipeline.from_pretrained(str(TOY_DIR))
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([999]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, text).sample
        assert (out / LORA_FILE).is_file()
        pipe.load_lora_weights(str(out))
        after = pipe.unet(x, t, text).sample
    # The adapter is trained (peft starts B at zero, a no-op) and loads whole.
    assert not torch.equal(before, after)
    adapted = sum(name.endswith(".lora_A") for name, _ in pipe.unet.named_modules())
    assert adapted == len(load_file(str(out / LORA_FILE))) // 2 > 0


def test_distill_command_rejects_bad_arguments_before_work(tmp_path, capsys):
    assert main(["distill-toy-generator", "--out", str(tmp_path / "s"), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["distill-toy-generator", "--out", str(tmp_path / "s"),
                 "--teacher", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err


@pytest.mark.slow
def test_fast_recipe_on_the_toy_model_draws_each_captions_category():
    cfg = load_config("cpu_demo", ["generator.recipe=fast", "captions.shuffle=false",
                                   f"producer.captions_per_call={TOY_CATEGORIES}"])
    producer = DiffusionProducer(cfg, shard=0, num_shards=1)
    producer.start()
    try:
        groups = producer.next_groups()
    finally:
        producer.close()
    images = torch.cat([g.images_kchw for g in groups])
    labels = torch.tensor([parse_caption(g.caption)[0] for g in groups]).repeat_interleave(
        cfg.producer.images_per_caption)
    accuracy = float((classify(load_classifier(TOY_DIR), images) == labels).float().mean())
    assert accuracy >= 0.9, accuracy


@pytest.mark.slow
def test_fast_recipe_on_the_toy_model_runs_the_hybrid_job(tmp_path):
    out = tmp_path / "demo"
    args = ["--config", "cpu_demo", f"output_dir={out}", "generator.recipe=fast",
            "train.steps=6", "train.log_every=3", "train.image_grid_every=0",
            "eval.probe_at_end=false", "train.checkpoint_every=0"]
    procs = start_ranks(2, args, tmp_path / "logs")
    assert wait_all(procs, timeout=400) == [0, 0], read_logs(tmp_path / "logs")[-4000:]
    # The run's resolved config: the generator rank ran the shipped student at 4 LCM steps.
    g = load_config(str(out / "config.yaml")).generator
    assert (g.recipe, g.lora, g.scheduler, g.steps) == ("fast", "toy-lcm-lora", "lcm", 4)


@pytest.mark.slow
def test_sampler_table_quick_run_writes_its_table(tmp_path):
    """benchmarks/sampler_table.py --quick: teacher and student rows, an encoder trained on the
    student's stored images and probed on real renders, real renders' diversity beside."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampler_table.py"),
                           "--quick", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "sampler_table.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"teacher_dpm2", "student_lcm1"}
    assert all(0 <= row["alignment"] <= 1 and row["images_per_s"] > 0 for row in rows.values())
    assert rows["student_lcm1"]["encoder"]["pool_images"] == 2 * TOY_CATEGORIES * 4
    assert 0 <= rows["student_lcm1"]["encoder"]["linear_top1"][0] <= 1
    assert 0 < result["real"]["pixel_diversity"] < 1
    assert "| real renders |" in (tmp_path / "sampler_table.md").read_text()
