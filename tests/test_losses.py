"""The losses against a naive per-row reference, a closed form, and lightly's NT-Xent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from online_stablerep.config.schema import LossConfig
from online_stablerep.losses import (
    StableRepLoss,
    image_text_contrastive_loss,
    multi_positive_contrastive_loss,
)


def view_major_ids(caption_ids: list[int], k: int) -> torch.Tensor:
    """(k * n,) ids of a view-major batch whose groups hold `caption_ids` in order."""
    return torch.tensor(caption_ids * k, dtype=torch.long)


def naive_multi_positive(features: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    """PAPER.md's definition, row by row."""
    f = F.normalize(features.double(), dim=1)
    rows = []
    for i in range(len(f)):
        others = [j for j in range(len(f)) if j != i]
        logits = torch.stack([f[i] @ f[j] / tau for j in others])
        log_prob = logits - torch.logsumexp(logits, dim=0)
        positives = [p for p, j in enumerate(others) if ids[j] == ids[i]]
        rows.append(-sum(log_prob[p] for p in positives) / len(positives))
    return torch.stack(rows).mean()


def naive_image_text(images, ids, texts, text_ids, logit_scale) -> torch.Tensor:
    scale = math.exp(float(logit_scale))
    im, tx = F.normalize(images.double(), dim=1), F.normalize(texts.double(), dim=1)

    def direction(queries, query_ids, keys, key_ids):
        rows = []
        for q, qid in zip(queries, query_ids, strict=True):
            log_prob = torch.log_softmax(scale * keys @ q, dim=0)
            positives = [j for j, kid in enumerate(key_ids) if kid == qid]
            rows.append(-sum(log_prob[j] for j in positives) / len(positives))
        return torch.stack(rows).mean()

    return (direction(im, ids, tx, text_ids) + direction(tx, text_ids, im, ids)) / 2


LAYOUTS = {
    "k2_distinct": view_major_ids([3, 1, 4, 5], 2),
    "k3_distinct": view_major_ids([10, 20, 30], 3),
    "k6_distinct": view_major_ids([0, 1], 6),
    "duplicate_caption": view_major_ids([7, 2, 7, 9], 3),
    "shuffled_rows": torch.tensor([5, 1, 5, 2, 1, 2, 2, 5]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_naive_reference_loss_and_gradient(layout: str) -> None:
    ids = LAYOUTS[layout]
    torch.manual_seed(0)
    features = torch.randn(len(ids), 16, requires_grad=True)
    reference_features = features.detach().clone().requires_grad_(True)

    loss = multi_positive_contrastive_loss(features, ids, temperature=0.1)
    reference = naive_multi_positive(reference_features, ids, 0.1)
    loss.backward()
    reference.backward()

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        features.grad.double(), reference_features.grad.double(), rtol=1e-4, atol=1e-6
    )


def test_closed_form_identical_positives_orthogonal_negatives() -> None:
    # n captions x k views; every view of caption c is the unit vector e_c. A row sees k - 1
    # positives at logit 1/tau and N - k negatives at logit 0, so its loss is
    # log((k - 1) + (N - k) * exp(-1/tau)).
    n, k, tau = 5, 3, 0.2
    features = torch.eye(8)[:n].repeat(k, 1) * 3.0  # scale is removed by the normalisation
    ids = view_major_ids(list(range(n)), k)
    expected = math.log((k - 1) + (n * k - k) * math.exp(-1 / tau))
    loss = multi_positive_contrastive_loss(features, ids, temperature=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_two_views_distinct_captions_is_lightly_ntxent(tau: float) -> None:
    torch.manual_seed(1)
    n = 6
    out0, out1 = torch.randn(n, 32), torch.randn(n, 32)
    # Our layout is view-major: rows 0..n-1 are view 0, rows n..2n-1 view 1.
    ours = multi_positive_contrastive_loss(
        torch.cat([out0, out1]), view_major_ids(list(range(100, 100 + n)), 2), temperature=tau
    )
    theirs = NTXentLoss(temperature=tau)(out0, out1)  # mean over the 2n rows
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_duplicate_caption_across_groups_counts_all_rows_as_positives() -> None:
    torch.manual_seed(2)
    ids = view_major_ids([7, 2, 7], 2)  # groups 0 and 2 share caption 7
    features = torch.randn(len(ids), 8)
    with_ids = multi_positive_contrastive_loss(features, ids)
    positional = multi_positive_contrastive_loss(features, view_major_ids([0, 1, 2], 2))
    torch.testing.assert_close(with_ids.double(), naive_multi_positive(features, ids, 0.1))
    # Positional labels would call the other group's views of caption 7 negatives.
    assert not torch.isclose(with_ids, positional)

    # Make every view of caption 7 identical and orthogonal to the rest: with all four rows as
    # positives the loss of those rows is exactly log(3 + 2 * exp(-1/tau)).
    features = torch.zeros(6, 4)
    features[ids == 7, 0] = 1.0
    features[ids == 2, 1] = 1.0
    per_row_7 = math.log(3 + 2 * math.exp(-10.0))
    per_row_2 = math.log(1 + 4 * math.exp(-10.0))
    expected = (4 * per_row_7 + 2 * per_row_2) / 6
    assert multi_positive_contrastive_loss(features, ids).item() == pytest.approx(expected)


def test_row_without_positive_raises() -> None:
    ids = torch.tensor([0, 1, 0, 2])  # caption 1 and 2 have one row each
    with pytest.raises(ValueError, match=r"\[1, 3\] have no positive"):
        multi_positive_contrastive_loss(torch.randn(4, 8), ids)


def test_bf16_features_computed_in_fp32() -> None:
    torch.manual_seed(3)
    features = torch.randn(8, 16)
    ids = view_major_ids([0, 1, 2, 3], 2)
    loss = multi_positive_contrastive_loss(features.bfloat16(), ids)
    assert loss.dtype == torch.float32
    expected = multi_positive_contrastive_loss(features.bfloat16().float(), ids)
    torch.testing.assert_close(loss, expected)


# The loss takes the scale as given (the trainer clamps the parameter after each step).
@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), 4.0])
def test_image_text_matches_naive_reference(logit_scale: float) -> None:
    torch.manual_seed(4)
    captions = [11, 5, 11, 8]  # caption 11 held by two groups: two texts, six images
    k = 3
    ids = view_major_ids(captions, k)
    images = torch.randn(len(ids), 16, requires_grad=True)
    texts = torch.randn(len(captions), 16, requires_grad=True)
    scale = torch.tensor(logit_scale, requires_grad=True)
    loss = image_text_contrastive_loss(images, ids, texts, torch.tensor(captions), scale)
    reference = naive_image_text(images, ids, texts, captions, logit_scale)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert images.grad is not None and texts.grad is not None
    # The clamp stops the scale's gradient once it passes log(100).
    assert (scale.grad.abs() > 0).item() == (logit_scale < math.log(100.0))


def test_image_text_text_without_image_raises() -> None:
    ids = view_major_ids([1, 2], 2)
    with pytest.raises(ValueError, match="text rows"):
        image_text_contrastive_loss(
            torch.randn(4, 8), ids, torch.randn(3, 8), torch.tensor([1, 2, 3]), torch.tensor(1.0)
        )


def test_stablerep_loss_named_terms_and_weights() -> None:
    torch.manual_seed(5)
    captions, k = [4, 9, 1], 2
    ids = view_major_ids(captions, k)
    outputs = {"image_embed": torch.randn(6, 8)}
    cfg = LossConfig(temperature=0.2, image_weight=0.5, text_weight=2.0)

    terms = StableRepLoss(cfg)(outputs, ids)
    assert set(terms) == {"loss", "loss_img"}
    torch.testing.assert_close(terms["loss"], 0.5 * terms["loss_img"])

    outputs.update(image_text_embed=torch.randn(6, 8), text_embed=torch.randn(3, 8),
                   logit_scale=torch.tensor(2.0))
    terms = StableRepLoss(cfg)(outputs, ids)
    assert set(terms) == {"loss", "loss_img", "loss_text"}
    # Text rows default to the group order of the view-major batch: caption_ids[:n].
    expected_text = image_text_contrastive_loss(
        outputs["image_text_embed"], ids, outputs["text_embed"], torch.tensor(captions),
        outputs["logit_scale"],
    )
    torch.testing.assert_close(terms["loss_text"], expected_text)
    torch.testing.assert_close(terms["loss"], 0.5 * terms["loss_img"] + 2.0 * expected_text)
