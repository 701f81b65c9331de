"""The model: forward shapes for a ViT and a CNN with both heads, BatchNorm per view chunk,
SyncBatchNorm1d against nn.BatchNorm1d, the text tower and its tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from online_stablerep.config.schema import Config, LossConfig, ModelConfig
from online_stablerep.losses.stablerep import StableRepLoss
from online_stablerep.models.encoder import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, build_model
from online_stablerep.models.head import ProjectionHead
from online_stablerep.models.sync_batchnorm import SyncBatchNorm1d
from online_stablerep.models.text import tokenize, vocab_size

N_CAPTIONS, K, SIZE = 3, 2, 32


def tiny_config(backbone: str, head: str, text_tower: bool = False) -> Config:
    return Config(
        model=ModelConfig(
            backbone=backbone, image_size=SIZE, head=head, head_hidden_dim=32, embed_dim=16,
            drop_path_rate=0.1, text_tower=text_tower, text_width=32, text_layers=1,
            text_heads=2, text_context_length=12, image_text_dim=24,
        )
    )


@pytest.mark.parametrize(
    ("backbone", "features"), [("vit_tiny_patch16_224", 192), ("resnet10t", 512)]
)
@pytest.mark.parametrize("head", ["mlp_bn", "mlp_ln"])
def test_forward_shapes(backbone: str, features: int, head: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone, head).model)
    images = torch.randn(N_CAPTIONS * K, 3, SIZE, SIZE)
    outputs = model(images, K)
    assert set(outputs) == {"image_embed"}
    assert outputs["image_embed"].shape == (N_CAPTIONS * K, 16)
    assert model.encode_image(images).shape == (N_CAPTIONS * K, features)
    outputs["image_embed"].sum().backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_vit_is_built_for_the_configured_image_size() -> None:
    model = build_model(tiny_config("vit_tiny_patch16_224", "mlp_bn").model)
    # (32 / 16)^2 patches + the CLS token.
    assert model.backbone.pos_embed.shape[1] == (SIZE // 16) ** 2 + 1


def test_unknown_backbone_raises() -> None:
    with pytest.raises(ValueError, match="model.backbone='no_such_net'"):
        build_model(tiny_config("no_such_net", "mlp_bn").model)


def test_text_tower_outputs_and_logit_scale() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet10t", "mlp_bn", text_tower=True).model)
    captions = ["a red fox", "two boats on a lake", "a bowl of ramen"]
    tokens = tokenize(captions, 12)
    outputs = model(torch.randn(N_CAPTIONS * K, 3, SIZE, SIZE), K, tokens)
    assert outputs["text_embed"].shape == (N_CAPTIONS, 24)
    assert outputs["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    assert LOGIT_SCALE_INIT == pytest.approx(math.log(1 / 0.07))
    outputs["text_embed"].sum().backward()
    assert model.text_tower.token_embedding.weight.grad is not None


def test_image_text_term_uses_its_own_linear_projection_of_the_backbone() -> None:
    # Official StableRepMM: image_emb = backbone features @ image_projection, not the BN head.
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet10t", "mlp_bn", text_tower=True).model)
    model.eval()
    images = torch.randn(N_CAPTIONS * K, 3, SIZE, SIZE)
    outputs = model(images, K, tokenize(["a", "b", "c"], 12))
    features = model.encode_image(images)
    torch.testing.assert_close(outputs["image_text_embed"], features @ model.image_projection.weight.T)
    assert outputs["image_text_embed"].shape == (N_CAPTIONS * K, 24)
    assert outputs["image_embed"].shape == (N_CAPTIONS * K, 16)  # the head's own space
    # The image-text loss reaches the projection and the backbone, not the head.
    loss = StableRepLoss(LossConfig(image_weight=0.0, text_weight=1.0))(
        outputs, torch.tensor([5, 6, 7] * K))["loss"]
    loss.backward()
    assert model.image_projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.head.parameters())


def test_logit_scale_keeps_its_gradient_at_the_bound_and_is_clamped_after_the_step() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet10t", "mlp_bn", text_tower=True).model)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE_MAX + 0.5)
    outputs = model(torch.randn(N_CAPTIONS * K, 3, SIZE, SIZE), K, tokenize(["a", "b", "c"], 12))
    loss = StableRepLoss(LossConfig(image_weight=0.0))(outputs, torch.tensor([5, 6, 7] * K))
    loss["loss"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


def test_stablerep_pp_defaults_are_the_official_text_tower_and_projections() -> None:
    # StableRepMM (vit_base): 12 layers of width 512, 8 heads, QuickGELU, projections to 512.
    m = ModelConfig()
    assert (m.text_layers, m.text_width, m.text_heads, m.text_activation, m.image_text_dim) == (
        12, 512, 8, "quick_gelu", 512)
    assert m.embed_dim == 256  # the multi-positive head's output, a separate space


@pytest.mark.parametrize("activation, expected", [("quick_gelu", QuickGELU), ("gelu", nn.GELU)])
def test_text_tower_activation_is_configurable(activation: str, expected: type) -> None:
    cfg = tiny_config("resnet10t", "mlp_bn", text_tower=True)
    cfg.model.text_activation = activation
    model = build_model(cfg.model)
    acts = [type(block.mlp.gelu) for block in model.text_tower.transformer.resblocks]
    assert acts == [expected] * cfg.model.text_layers
    # QuickGELU is CLIP's x * sigmoid(1.702 x), not the exact GELU.
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    assert not torch.allclose(QuickGELU()(x), nn.GELU()(x), atol=1e-3)
    assert model.text_tower.text_projection.shape == (32, 24)
    assert model.image_projection.weight.shape == (24, 512) and model.image_projection.bias is None


def test_text_tokens_without_tower_raise() -> None:
    model = build_model(tiny_config("resnet10t", "mlp_bn").model)
    with pytest.raises(ValueError, match="text_tower"):
        model(torch.randn(4, 3, SIZE, SIZE), 2, tokenize(["a", "b"], 12))


def test_tokenize_uses_clip_vocabulary() -> None:
    tokens = tokenize(["a photo of a cat", "word " * 40], 16)
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    assert vocab_size() == 49408
    start, end = 49406, 49407
    assert tokens[0, 0] == start and end in tokens[0].tolist() and tokens[0, -1] == 0
    assert tokens[1, -1] == end  # cut to the context, end token kept


def test_head_batchnorm_statistics_are_per_view_chunk() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(8, 16, 4, "mlp_bn").train()
    # The two view chunks come from different distributions, so their statistics differ.
    features = torch.cat([torch.randn(5, 8), torch.randn(5, 8) * 4 + 2])
    per_chunk = head(features, num_chunks=2)
    one_by_one = torch.cat([head(chunk, num_chunks=1) for chunk in features.chunk(2)])
    whole_batch = head(features, num_chunks=1)
    torch.testing.assert_close(per_chunk, one_by_one)
    assert not torch.allclose(per_chunk, whole_batch, atol=1e-3)


def test_model_rejects_batch_not_divisible_by_views() -> None:
    model = build_model(tiny_config("resnet10t", "mlp_ln").model)
    with pytest.raises(ValueError, match="does not split into 4 views"):
        model(torch.randn(6, 3, SIZE, SIZE), 4)


def test_sync_batchnorm_equals_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    ours, theirs = SyncBatchNorm1d(6), nn.BatchNorm1d(6)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())  # same names: state dicts interchange

    for step in range(3):
        x = torch.randn(10, 6) * (step + 1) + step
        upstream = torch.randn(10, 6)
        x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
        torch.testing.assert_close(out_ours, out_theirs)
        (out_ours * upstream).sum().backward()
        (out_theirs * upstream).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))

    ours.eval()
    theirs.eval()
    x = torch.randn(4, 6)
    torch.testing.assert_close(ours(x), theirs(x))


def test_sync_batchnorm_chunks_update_running_stats_like_successive_calls() -> None:
    torch.manual_seed(1)
    ours, theirs = SyncBatchNorm1d(3), nn.BatchNorm1d(3)
    x = torch.randn(12, 3)
    ours(x, num_chunks=3)
    for chunk in x.chunk(3):
        theirs(chunk)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 3


def test_sync_batchnorm_keeps_input_dtype() -> None:
    bn = SyncBatchNorm1d(4)
    assert bn(torch.randn(6, 4).bfloat16(), num_chunks=2).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_step_matches_fp32() -> None:
    torch.manual_seed(0)
    cfg = tiny_config("vit_tiny_patch16_224", "mlp_bn", text_tower=True)
    cfg.model.drop_path_rate = 0.0  # both forwards must see the same network
    model = build_model(cfg.model).cuda()
    captions = ["a red fox", "two boats on a lake", "a bowl of ramen"]
    tokens = tokenize(captions, 12).cuda()
    ids = torch.tensor([5, 6, 7] * K).cuda()
    images = torch.randn(N_CAPTIONS * K, 3, SIZE, SIZE).cuda()
    loss_fn = StableRepLoss(LossConfig())

    reference = loss_fn(model(images, K, tokens), ids)["loss"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        terms = loss_fn(model(images, K, tokens), ids)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    torch.testing.assert_close(terms["loss"], reference, atol=0.05, rtol=0.05)
    terms["loss"].backward()
    assert model.logit_scale.grad is not None
