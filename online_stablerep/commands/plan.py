"""`online-stablerep plan`: recommend the split of generator and trainer GPUs and the replay
settings, from measured rates, benchmark results files, or the FLOP model (labelled ESTIMATED)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from online_stablerep.commands.common import add_config_arguments, load_or_report
from online_stablerep.config.recipes import RECIPES
from online_stablerep.config.schema import Config
from online_stablerep.planning import flops
from online_stablerep.planning.planner import Plan, format_plan, plan_split
from online_stablerep.planning.reuse_evidence import load_reuse_evidence
from online_stablerep.producers.sampling import plan_steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="sd15_vitb16")
    parser.add_argument("--gen-images-per-s", type=float, default=None,
                        help="measured images/s of one generator GPU")
    parser.add_argument("--train-images-per-s", type=float, default=None,
                        help="measured views/s (images/s) of one trainer GPU")
    parser.add_argument("--from-results", nargs="+", default=[], metavar="JSON",
                        help="benchmarks/results/{generator,trainer}-*.json to take rates from")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--reuse-budget", type=float, default=None,
                        help="largest acceptable mean uses per caption group "
                             "(default: the config's replay.max_reuse)")
    parser.add_argument("--no-colocated", action="store_true",
                        help="recommend only splits with dedicated generator GPUs")
    parser.add_argument("--total-views", type=float, default=9e8,
                        help="views the hours column counts (default: the paper's 1x schedule)")
    parser.add_argument("--gpu-type", default="h100", choices=sorted(flops.PEAK_BF16_TFLOPS),
                        help="GPU whose bf16 peak the FLOP estimates use")
    parser.add_argument("--recipe", default=None, choices=["", *RECIPES],
                        help="generator recipe to plan with (same as generator.recipe=NAME; "
                             "default: the config's)")


def _read_results(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--from-results: no such file {path}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--from-results {path}: not JSON ({err})") from None


def _field(data: dict, key: str, path: str) -> object:
    if key not in data:
        raise ValueError(f"--from-results {path}: missing key {key!r}")
    return data[key]


def _trainer_rate(data: dict, path: str, cfg: Config) -> float:
    """DeepSpeed-engine views/s of the config's backbone at its image size
    (benchmarks/trainer.py's rows)."""
    m = cfg.model
    rows = _field(data, "rows", path)
    for row in rows:
        if (row.get("engine") == "deepspeed" and row.get("backbone") == m.backbone
                and row.get("image_size") == m.image_size):
            return float(row["images_per_s"])
    measured = sorted({f"{r.get('backbone')}@{r.get('image_size')}" for r in rows})
    raise ValueError(
        f"--from-results {path}: no deepspeed row for model.backbone={m.backbone} at "
        f"model.image_size={m.image_size} (measured: {', '.join(measured)})"
    )


def _generator_rate(data: dict, path: str, cfg: Config) -> float:
    """Images/s of the config's recipe (the compiled recipe row of benchmarks/generator.py;
    the `ours` row when the config has no recipe), measured on the config's model and steps.
    Files of the earlier layout (`ours_images_per_s`, no recipes) count as recipe ""."""
    settings = _field(data, "settings", path)
    g = cfg.generator
    # A released checkpoint runs at the speed of its architecture's random-weight twin.
    model = flops.KNOWN_CHECKPOINTS.get(g.model, g.model)
    if "model" in settings and settings["model"] != model:
        raise ValueError(f"--from-results {path}: measured model={settings['model']!r}, the "
                         f"config has generator.model={g.model!r}")
    if "rows" not in data:
        if g.recipe:
            raise ValueError(f"--from-results {path}: measured without a recipe, the config has "
                             f"generator.recipe={g.recipe!r} (generator.recipe='' plans "
                             "without one)")
        row = {"steps": settings.get("steps", g.steps),
               "images_per_s": _field(data, "ours_images_per_s", path)}
    else:
        wanted = (lambda r: r.get("scenario") == "ours") if not g.recipe else (
            lambda r: r.get("kind") == "recipe" and r.get("recipe") == g.recipe
            and r.get("compile"))
        found = [r for r in data["rows"] if wanted(r)]
        if not found:
            measured = sorted({r.get("recipe") for r in data["rows"] if r.get("kind") == "recipe"})
            raise ValueError(f"--from-results {path}: no row for generator.recipe={g.recipe!r} "
                             f"(measured recipes: {', '.join(measured) or 'none'})")
        row = found[0]
    if row["steps"] != g.steps:
        raise ValueError(f"--from-results {path}: measured steps={row['steps']!r}, the config "
                         f"has generator.steps={g.steps!r}")
    # Files written before the paper recipe became DDIM-50 hold 20-step "paper" rows.
    scheduler = row.get("scheduler", settings.get("scheduler", g.scheduler))
    if scheduler != g.scheduler:
        raise ValueError(f"--from-results {path}: measured scheduler={scheduler!r}, the config "
                         f"has generator.scheduler={g.scheduler!r}")
    return float(row["images_per_s"])


def resolve_rates(args: argparse.Namespace, cfg: Config) -> tuple[float, str, float, str]:
    """(gen images/s, its source, train views/s, its source) per GPU: flags first, then results
    files (named generator-*.json or trainer-*.json by the benchmarks), then the FLOP model."""
    gen = train = None
    gen_source = train_source = ""
    for path in args.from_results:
        data = _read_results(path)
        kind = Path(path).name.split("-")[0]
        where = f"measured: {path} on {_field(data, 'machine', path)}"
        if kind == "trainer":
            train, train_source = _trainer_rate(data, path, cfg), where
        elif kind == "generator":
            gen, gen_source = _generator_rate(data, path, cfg), where
        else:
            raise ValueError(f"--from-results {path}: expected a generator-*.json or "
                             "trainer-*.json file of benchmarks/")
    if args.gen_images_per_s is not None:
        gen, gen_source = args.gen_images_per_s, "measured: --gen-images-per-s"
    if args.train_images_per_s is not None:
        train, train_source = args.train_images_per_s, "measured: --train-images-per-s"
    gpu = args.gpu_type
    peak = flops.PEAK_BF16_TFLOPS[gpu]
    if gen is None:
        if cfg.producer.kind != "diffusion":
            raise ValueError(f"producer.kind={cfg.producer.kind!r} has no FLOP model: pass "
                             "--gen-images-per-s")
        per_image = flops.generator_flops_per_image(cfg)
        gen = flops.estimated_rate(per_image, gpu, flops.GENERATION_UTILISATION)
        g = cfg.generator
        guided = sum(kind.guided for kind in plan_steps(g.steps, tuple(g.guidance_interval),
                                                         g.base_steps))
        gen_source = (f"ESTIMATED: {flops.flop_text(per_image)}/image ({g.model}, recipe "
                      f"{g.recipe or 'none'}, {g.steps} steps, guidance {g.guidance} on "
                      f"{guided}{', tiny VAE' if g.tiny_vae else ''}) at "
                      f"{flops.GENERATION_UTILISATION:.0%} of {gpu} {peak:g} TFLOP/s")
    if train is None:
        per_view = flops.train_flops_per_view(cfg)
        train = flops.estimated_rate(per_view, gpu, flops.TRAINING_UTILISATION)
        train_source = (f"ESTIMATED: {flops.flop_text(per_view)}/view ({cfg.model.backbone} at "
                        f"{cfg.model.image_size}, fwd+bwd) at "
                        f"{flops.TRAINING_UTILISATION:.0%} of {gpu} {peak:g} TFLOP/s")
    return gen, gen_source, train, train_source


def make_plan(args: argparse.Namespace, cfg: Config) -> Plan:
    """The plan for parsed `plan` arguments and a loaded config."""
    gen, gen_source, train, train_source = resolve_rates(args, cfg)
    budget = args.reuse_budget if args.reuse_budget is not None else cfg.replay.max_reuse
    plan = plan_split(
        gen_images_per_s=gen,
        train_views_per_s=train,
        gpus_per_node=args.gpus,
        nodes=args.nodes,
        captions_per_batch=cfg.batch.captions_per_batch,
        views_per_caption=cfg.batch.views_per_caption,
        images_per_caption=cfg.producer.images_per_caption,
        reuse_budget=budget,
        gen_source=gen_source,
        train_source=train_source,
        include_colocated=not args.no_colocated,
    )
    if args.reuse_budget is None:
        plan.notes.append(f"reuse budget: the config's replay.max_reuse={budget} "
                          "(--reuse-budget sets another)")
    evidence = load_reuse_evidence()
    if evidence is None:
        plan.notes.append("reuse cost not measured here: run benchmarks/online_vs_fixed.py")
    else:
        plan.notes.append(evidence.note())
        if budget > evidence.supported_reuse:
            plan.notes.append(f"the reuse budget {budget:g} is above the {evidence.supported_reuse} "
                              "the measurement supports: expect a lower probe than fresh images "
                              "(docs/evidence.md)")
    return plan


def run(args: argparse.Namespace) -> int:
    if args.recipe is not None:
        # An empty value must be quoted: a bare `key=` reads as null.
        recipe = args.recipe or "''"
        args.overrides = [*args.overrides, f"generator.recipe={recipe}"]
    cfg = load_or_report(args)
    if cfg is None:
        return 2
    try:
        plan = make_plan(args, cfg)
    except ValueError as err:
        print(f"plan error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.total_views))
    # The plan's keys replace the same keys given on the command line.
    planned = plan.overrides()
    keys = {item.split("=", 1)[0] for item in planned}
    kept = [item for item in args.overrides if item.split("=", 1)[0] not in keys]
    config = f" --config {args.config}" if args.config else ""
    print(f"launch:    launch/train.sh{config} " + " ".join([*kept, *planned]))
    return 0
