"""The split planner against closed forms, its CLI, and the FLOP model against published figures."""

import json
import math

import pytest

from online_stablerep.cli import main as cli_main
from online_stablerep.config import load_config
from online_stablerep.planning import plan_deviation, plan_split
from online_stablerep.planning.flops import (
    count_diffusion_flops,
    flops_per_generated_image,
    train_flops_per_view,
)


def hybrid_plan(g, t, gpus=4, n=4, k=2, m=2, budget=100.0, nodes=1):
    return plan_split(g, t, gpus, nodes, n, k, m, budget, include_colocated=False)


def test_required_reuse_is_demand_over_supply():
    plan = hybrid_plan(g=10.0, t=30.0)
    for split in plan.candidates:
        assert split.required_reuse == pytest.approx(split.trainers * 30.0 / (split.generators * 10))
    # Groups of m images, k views per use: group reuse scales by m / k.
    plan = hybrid_plan(g=10.0, t=30.0, k=5, m=10)
    assert plan.split_for("1").required_reuse == pytest.approx(3 * 30 / 10 * 10 / 5)


def test_trainer_bound_split_keeps_trainers_busy_with_least_reuse_cap():
    plan = hybrid_plan(g=100.0, t=100.0, budget=4)
    best = plan.best
    assert plan.feasible and (best.generators, best.trainers) == (1, 3)
    assert best.trainer_utilisation == pytest.approx(1.0)
    assert best.views_per_s == pytest.approx(300.0)
    assert best.mean_reuse == pytest.approx(3.0) and best.max_reuse == 3
    assert best.steps_per_s == pytest.approx(300.0 / (4 * 2 * 3))
    assert best.capacity == 2 * 4 * 3
    assert plan.overrides()[:3] == ["roles.generators=1", "replay.max_reuse=3",
                                    "replay.capacity=24"]
    assert "plan.source=measured" in plan.overrides()


def test_generators_bottleneck_caps_reuse_and_idles_trainers():
    plan = hybrid_plan(g=10.0, t=100.0, budget=2)
    best = plan.best
    assert (best.generators, best.trainers) == (3, 1)
    assert best.views_per_s == pytest.approx(3 * 10 * 2)  # supply x reuse cap
    assert best.trainer_utilisation == pytest.approx(0.6)
    assert best.generator_utilisation == pytest.approx(1.0)
    assert best.mean_reuse == 2.0 and best.max_reuse == 2
    assert not plan.feasible
    assert "INFEASIBLE" in plan.message
    assert "least-reuse split (3 generator(s), 1 trainer(s)) needs mean reuse 3.3" in plan.message


def test_colocated_time_shares_every_gpu():
    plan = plan_split(10.0, 100.0, 4, 1, 4, 2, 2, 2.0)
    colocated = plan.split_for("0")
    # One group use costs k/t training + m/(R g) generating seconds on each GPU.
    uses_per_s = 4 / (2 / 100 + 2 / (2 * 10))
    assert colocated.views_per_s == pytest.approx(uses_per_s * 2)
    assert plan.best is colocated and plan.best_hybrid.roles_spec == "3"
    assert math.isinf(colocated.required_reuse)


def test_multi_node_roles_are_per_node():
    plan = hybrid_plan(g=100.0, t=100.0, nodes=2, budget=4)
    assert plan.best.roles_spec == "1/node" and plan.best.trainers == 6


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="reuse budget"):
        plan_split(1.0, 1.0, 2, 1, 4, 2, 2, 0.5)
    with pytest.raises(ValueError, match="gen_images_per_s"):
        plan_split(0.0, 1.0, 2, 1, 4, 2, 2, 2.0)


def test_deviation_names_each_figure_against_the_plan():
    plan = hybrid_plan(g=100.0, t=100.0, budget=4)
    line = plan_deviation(plan, {"train/images_per_s": 270.0, "buffer/mean_reuse": 3.0,
                                 "train/idle_fraction": 0.1})
    assert "trained views/s 270 (plan 300, -10%)" in line
    assert "mean reuse 3 (plan 3, +0%)" in line and "trainer idle 10% (plan 0%)" in line
    assert "measured" in line
    assert "(plan 200," in plan_deviation(plan, {"train/images_per_s": 200.0}, roles_spec="2")


def run_plan(capsys, *argv):
    code = cli_main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_cli_estimates_from_flops_and_says_so(capsys):
    code, out, _ = run_plan(capsys, "--config", "sd15_vitb16", "--gpus", "8")
    assert code == 0
    assert "ESTIMATED: 82.8 TFLOP/image" in out and "figures are ESTIMATED" in out  # DDIM-50
    overrides = out.split("overrides: ")[1].splitlines()[0].split()
    cfg = load_config("sd15_vitb16", overrides)
    assert cfg.replay.max_reuse >= 1 and cfg.replay.capacity >= cfg.batch.captions_per_batch


def test_cli_measured_rates_are_labelled_measured(capsys, tmp_path):
    code, out, _ = run_plan(capsys, "--config", "cpu_demo", "--gpus", "2",
                            "--gen-images-per-s", "40", "--train-images-per-s", "60",
                            "--reuse-budget", "2", "--no-colocated")
    assert code == 0 and "ESTIMATED" not in out and "from measured rates" in out
    launch = out.split("launch:    launch/train.sh ")[1].split()
    assert launch[:2] == ["--config", "cpu_demo"]
    cfg = load_config("cpu_demo", launch[2:])
    assert cfg.roles.generators == "1" and cfg.replay.max_reuse == 2


def test_cli_reads_benchmark_results(capsys, tmp_path):
    trainer = tmp_path / "trainer-x.json"
    trainer.write_text(json.dumps({
        "benchmark": "trainer", "machine": "cpu-2core", "summary": {},
        "rows": [{"engine": "deepspeed", "backbone": "resnet10t", "image_size": 32,
                  "images_per_s": 60.0}]}))
    generator = tmp_path / "generator-x.json"
    generator.write_text(json.dumps({"machine": "cpu-2core", "ours_images_per_s": 40.0,
                                     "settings": {"model": "toy", "steps": 4}}))
    code, out, _ = run_plan(capsys, "--config", "cpu_demo", "--gpus", "2",
                            "--from-results", str(trainer), str(generator))
    assert code == 0 and f"[measured: {trainer} on cpu-2core]" in out
    assert "40 images/s per GPU" in out and "ESTIMATED" not in out
    code, _, err = run_plan(capsys, "--config", "cpu_demo", "model.image_size=64",
                            "--from-results", str(trainer))
    assert code == 2 and "no deepspeed row for model.backbone=resnet10t" in err
    code, _, err = run_plan(capsys, "--config", "cpu_demo", "generator.steps=8",
                            "--from-results", str(generator))
    assert code == 2 and "measured steps=4, the config has generator.steps=8" in err


def test_cli_bad_config_exits_2(capsys):
    code, _, err = run_plan(capsys, "--config", "cpu_demo", "batch.views_per_caption=1")
    assert code == 2 and "batch.views_per_caption" in err
    code, _, err = run_plan(capsys, "--from-results", "/nonexistent.json")
    assert code == 2 and "no such file" in err


@pytest.mark.slow
def test_flop_model_reproduces_published_sd15_figures():
    counted = count_diffusion_flops("sd15", 512)
    assert counted.unet_forward == pytest.approx(803e9, rel=0.01)
    assert counted.vae_decode == pytest.approx(2.5e12, rel=0.02)
    per_image = flops_per_generated_image(counted, steps=20, guidance_scales=[2.0],
                                          images_per_caption=10)
    assert per_image == pytest.approx(34.7e12, rel=0.01)
    no_cfg = flops_per_generated_image(counted, 20, [1.0], 10)
    assert no_cfg == pytest.approx(counted.unet_forward * 20 + counted.vae_decode, rel=0.001)


@pytest.mark.slow
def test_vit_b16_view_costs_three_forwards():
    # timm's often-quoted 17.6 "GFLOPs" for ViT-B/16 are multiply-adds: 35 GFLOP forward.
    cfg = load_config("sd15_vitb16", ["batch.captions_per_batch=2", "batch.views_per_caption=2"])
    assert 100e9 < train_flops_per_view(cfg) < 110e9


def test_reuse_evidence_names_the_largest_reuse_within_tolerance(tmp_path):
    import json

    from online_stablerep.planning.reuse_evidence import load_reuse_evidence

    assert load_reuse_evidence(tmp_path) is None
    rows = [{"max_reuse": r, "draw": draw, "k": 4, "linear_top1": top1}
            for r, top1 in [(1, 0.60), (1, 0.62), (3, 0.60), (9, 0.595), (27, 0.50)]
            for draw in ("random", "sequential")]
    rows.append({"max_reuse": 27, "draw": "random", "k": 2, "linear_top1": 0.9})  # other k
    (tmp_path / "reuse-cpu-2core.json").write_text(
        json.dumps({"settings": {"steps": 300}, "rows": rows}))
    evidence = load_reuse_evidence(tmp_path)
    assert evidence.top1_by_reuse[1] == pytest.approx(0.61)
    assert evidence.supported_reuse == 9  # 0.595 >= 0.61 - 0.02; R=27 falls 11 points
    assert "R=27 0.500" in evidence.note() and "reuse up to 9" in evidence.note()


def test_reuse_evidence_prefers_the_online_vs_fixed_measurement(tmp_path):
    import json

    from online_stablerep.planning.reuse_evidence import load_reuse_evidence

    (tmp_path / "reuse-cpu-2core.json").write_text(json.dumps({"settings": {"steps": 300}, "rows": [
        {"max_reuse": 1, "draw": "random", "k": 4, "linear_top1": 0.9}]}))
    table = [{"arm": "online_r1", "seeds": 3, "linear_top1": 0.70, "linear_top1_ci95": 0.02},
             {"arm": "online_r3", "seeds": 3, "linear_top1": 0.69, "linear_top1_ci95": 0.03},
             {"arm": "online_r9", "seeds": 2, "linear_top1": 0.64, "linear_top1_ci95": 0.05},
             {"arm": "fixed_equal", "seeds": 3, "linear_top1": 0.62, "linear_top1_ci95": 0.01}]
    (tmp_path / "online_vs_fixed.json").write_text(json.dumps(
        {"settings": {"steps": 150, "suite": "procedural100"}, "table": table}))
    evidence = load_reuse_evidence(tmp_path)
    assert evidence.source.name == "online_vs_fixed.json" and evidence.seeds == 2
    assert evidence.supported_reuse == 3  # R=9 falls 6 points
    note = evidence.note()
    assert "R=3 0.690 ± 0.030" in note and "procedural100" in note and "150 steps" in note
    assert "fixed set of R=9's images (the paper's regime) 0.620 ± 0.010" in note
    assert "up to ±0.050, are wider than that: not resolved" in note


def test_flop_model_counts_each_recipe_lever():
    counted = count_diffusion_flops("sd15", 512)
    paper = flops_per_generated_image(counted, 20, [2.0], 10)
    assert flops_per_generated_image(counted, 20, [2.0], 10, guidance_interval=(0.0, 1.0)) == paper
    # Guidance on the first half: ten steps lose their unconditional pass.
    half = flops_per_generated_image(counted, 20, [2.0], 10, guidance_interval=(0.0, 0.5))
    assert paper - half == pytest.approx(10 * counted.unet_forward, rel=1e-3)
    tiny_vae = flops_per_generated_image(counted, 20, [2.0], 10, tiny_vae=True)
    assert paper - tiny_vae == pytest.approx(counted.vae_decode - counted.tiny_vae_decode)
    assert counted.tiny_vae_decode < 0.1 * counted.vae_decode
    cached = flops_per_generated_image(counted, 20, [2.0], 10, deep_cache_every=2)
    assert paper - cached == pytest.approx(
        10 * 2 * (counted.unet_forward - counted.unet_cached_forward), rel=1e-3)
    # fast: one guided base step + three plain distilled steps + TAESD.
    fast = flops_per_generated_image(counted, 4, [2.0], 10, (0.0, 0.25), base_steps=1,
                                     tiny_vae=True)
    assert fast == pytest.approx(5 * counted.unet_forward + counted.tiny_vae_decode
                                 + 2 * counted.text_encode / 10)
    assert paper / fast > 8


@pytest.mark.slow
def test_cli_plans_with_a_recipe(capsys):
    code, out, _ = run_plan(capsys, "--config", "sd15_vitb16", "--gpus", "8", "--recipe", "fast")
    assert code == 0 and "recipe fast, 4 steps, guidance 2.0 on 1, tiny VAE" in out
    assert "trainers can be kept busy within the reuse budget" in out
    best_hours = float(out.split("\n*")[1].splitlines()[0].split()[-1])
    assert best_hours <= 100
    assert "generator.recipe=fast" in out.split("launch:")[1]
    code, out, _ = run_plan(capsys, "--config", "sd15_vitb16", "--gpus", "8")
    assert "recipe paper" in out and "INFEASIBLE" in out


@pytest.mark.slow
def test_cli_reads_recipe_rows_of_generator_results(capsys, tmp_path):
    generator = tmp_path / "generator-x.json"
    generator.write_text(json.dumps({
        "benchmark": "generator", "machine": "gpu-x", "settings": {"model": "sd15"},
        "rows": [{"scenario": "ours", "kind": "lever", "recipe": "", "compile": False,
                  "steps": 20, "images_per_s": 7.0},
                 {"scenario": "fast_eager", "kind": "recipe", "recipe": "fast", "compile": False,
                  "steps": 4, "images_per_s": 30.0},
                 {"scenario": "fast", "kind": "recipe", "recipe": "fast", "compile": True,
                  "steps": 4, "images_per_s": 60.0}]}))
    code, out, _ = run_plan(capsys, "--config", "sd15_vitb16", "generator.model=sd15",
                            "--recipe", "fast", "--from-results", str(generator))
    assert code == 0 and "generator: 60 images/s per GPU  [measured" in out
    code, out, _ = run_plan(capsys, "--config", "sd15_vitb16", "generator.model=sd15",
                            "--recipe", "", "--from-results", str(generator))
    assert code == 0 and "generator: 7 images/s per GPU" in out
    code, _, err = run_plan(capsys, "--config", "sd15_vitb16", "generator.model=sd15",
                            "--recipe", "turbo", "--from-results", str(generator))
    assert code == 2 and "no row for generator.recipe='turbo'" in err


def test_paper_recipe_costs_fifty_guided_steps():
    from online_stablerep.planning.flops import generator_flops_per_image

    counted = count_diffusion_flops("sd15", 512)
    paper = generator_flops_per_image(load_config("sd15_vitb16"))
    assert paper == flops_per_generated_image(counted, 50, [2.0], 10)
    assert paper == pytest.approx(100 * counted.unet_forward + counted.vae_decode, rel=0.001)
    assert paper == pytest.approx(82.8e12, rel=0.01)
    dpm20 = generator_flops_per_image(load_config("sd15_vitb16", ["generator.recipe=dpm20"]))
    assert paper / dpm20 == pytest.approx(2.39, abs=0.01)


def test_cli_refuses_a_paper_row_of_another_sampler(capsys, tmp_path):
    # Results files written before `paper` became DDIM-50 hold DPM-Solver++ "paper" rows.
    generator = tmp_path / "generator-x.json"
    rows = [{"scenario": "paper", "kind": "recipe", "recipe": "paper", "compile": True,
             "scheduler": "dpm++", "steps": steps, "images_per_s": 9.0} for steps in (20, 50)]
    for row in rows:
        generator.write_text(json.dumps({"machine": "gpu-x", "settings": {"model": "sd15"},
                                         "rows": [row]}))
        code, _, err = run_plan(capsys, "--config", "sd15_vitb16", "generator.model=sd15",
                                "--from-results", str(generator))
        assert code == 2 and ("measured steps=20" in err or "measured scheduler='dpm++'" in err)
    row = dict(rows[1], scheduler="ddim")
    generator.write_text(json.dumps({"machine": "gpu-x", "settings": {"model": "sd15"},
                                     "rows": [row]}))
    code, out, _ = run_plan(capsys, "--config", "sd15_vitb16", "generator.model=sd15",
                            "--from-results", str(generator))
    assert code == 0 and "generator: 9 images/s per GPU  [measured" in out
