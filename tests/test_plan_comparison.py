"""The job's comparison of its logged figures with the plan it was configured from."""

from online_stablerep.config import load_config
from online_stablerep.distributed.roles import Roles
from online_stablerep.jobs.trainer_rank import plan_comparison


def test_no_plan_no_comparison():
    cfg = load_config("cpu_demo")
    assert plan_comparison(cfg, Roles(2, 1)) is None


def test_comparison_names_each_figure_and_its_deviation(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = load_config("cpu_demo", ["plan.gen_images_per_s=10", "plan.train_images_per_s=40"])
    compare = plan_comparison(cfg, Roles(2, 1))
    line = compare({"train/images_per_s": 20.0, "gen/images_per_s": 5.0,
                    "train/idle_fraction": 0.5})
    assert line.startswith("vs plan (measured)")
    assert "generated images/s 5" in line and "plan 10" in line and "-50%" in line
