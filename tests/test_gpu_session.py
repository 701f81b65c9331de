"""benchmarks/gpu_session.sh end to end on the CPU (GPU_SESSION_DRY=1): every step runs, the
generator step measures the paper recipe (DDIM 50) beside dpm20 and the stock pipeline at both
samplers, and nothing is written to benchmarks/results."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("generator", "trainer", "hybrid-job", "gpu-tests", "real-mix")


@pytest.mark.slow
def test_dry_session_runs_every_step_and_measures_the_paper_recipe(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # Generous step limits: the 50-step rows take minutes on a loaded CPU.
    env.update(GPU_SESSION_DRY="1", OUT=str(out), OMP_NUM_THREADS="1", GEN_S="900",
               TRAIN_S="300", HYBRID_S="300", TESTS_S="300", MIX_S="300",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    result = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1500)
    log = (out / "gpu_session.log").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in STEPS:
        assert f"== {step}: exit 0" in log, log[-4000:]
    rows = {row["scenario"]: row for row in json.loads(
        next(out.glob("generator-*.json")).read_text())["rows"]}
    assert {name: (row["scheduler"], row["steps"]) for name, row in rows.items()} == {
        "stock": ("dpm++", 20), "stock_ddim50": ("ddim", 50), "paper_eager": ("ddim", 50),
        "dpm20_eager": ("dpm++", 20)}
    assert rows["paper_eager"]["speedup_vs_stock_same_sampler"] > 0
    assert next(out.glob("trainer-*.json")) and next(out.glob("real-mix-*.json"))

    without_out = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT,
                                 env={**env, "OUT": ""}, capture_output=True, text=True,
                                 timeout=60)
    assert without_out.returncode == 2 and "needs OUT" in without_out.stdout
