"""TensorBoard answers the operator's questions: the custom-scalars layout, the HParams entry,
captioned grids of whole groups, and the console's balance advice."""

import pytest

from online_stablerep.monitoring.layout import BalanceAdvisor, custom_scalars_layout
from online_stablerep.monitoring.metrics import flat_hparams
from tests.helpers import TINY_PROCEDURAL, run_cli


def _accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_short_run_writes_layout_hparams_and_captioned_grid(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    result = run_cli(["train", "--config", "cpu_procedural", f"output_dir={tmp_path}",
                      *TINY_PROCEDURAL, "train.steps=4", "train.image_grid_every=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    acc = _accumulator(tmp_path / "tensorboard" / "train")
    # The CUSTOM SCALARS tab opens on Balance, Idle, Replay, Loss, Learning rate.
    assert "custom_scalars__config__" in acc.PluginTagToContent("custom_scalars")
    proto = acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    titles = [category.title for category in layout.category]
    assert titles == ["1 Balance", "2 Idle", "3 Replay", "4 Loss", "5 Learning rate"]
    # HParams: the config's values and the final loss.
    hparams = acc.PluginTagToContent("hparams")
    session = next(plugin_data_pb2.HParamsPluginData.FromString(v).session_start_info
                   for v in hparams.values()
                   if plugin_data_pb2.HParamsPluginData.FromString(v).HasField("session_start_info"))
    assert session.hparams["batch.captions_per_batch"].number_value == 8
    assert session.hparams["model.backbone"].string_value == "resnet10t"
    assert "final/loss" in acc.Tags()["scalars"]
    # The grid: 4 whole groups (3 images each, as made) with a text column beside them.
    image = acc.Images("buffer/received_groups")[-1]
    assert image.height == 16 + 34 + 4 * (96 + 6) + 16
    assert image.width == 16 + 3 * (96 + 6) + 16 + 360 + 16


def test_layout_tags_are_ones_the_job_logs():
    logged = {"gen/images_per_s", "gen/made_images_per_s", "train/images_per_s",
              "balance/implied_reuse", "buffer/mean_reuse", "train/idle_fraction",
              "gen/idle_fraction", "buffer/groups", "buffer/unused", "buffer/batch_overlap",
              "buffer/age_s", "train/loss", "train/lr"}
    import re

    for charts in custom_scalars_layout().values():
        for kind, patterns in charts.values():
            assert kind == "Multiline"
            for pattern in patterns:
                assert any(re.match(pattern, tag) for tag in logged), pattern


def test_advice_after_three_unbalanced_intervals_once_per_streak():
    advisor = BalanceAdvisor(patience=3)
    said = [advisor.observe(0.8, 0.0) for _ in range(5)]
    assert said[:2] == [None, None] and said[3:] == [None, None]
    assert said[2].startswith("generation-bound") and "online-stablerep plan" in said[2]
    assert advisor.observe(0.3, 0.0) is None  # balanced enough: the streak ends
    said = [advisor.observe(0.02, 0.9) for _ in range(3)]
    assert said[-1].startswith("training-bound")
    colocated = BalanceAdvisor(patience=1)
    assert colocated.observe(0.7, None).startswith("generation-bound")


def test_flat_hparams_dots_nested_keys_and_texts_lists():
    assert flat_hparams({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": True}) == {
        "a.b": 1, "a.c": "[1, 2]", "d": "None", "e": True}
