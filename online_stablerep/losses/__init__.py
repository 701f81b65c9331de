"""Contrastive objectives: StableRep's multi-positive loss and StableRep++'s image-text term."""

from online_stablerep.losses.image_text import image_text_contrastive_loss
from online_stablerep.losses.multi_positive import multi_positive_contrastive_loss
from online_stablerep.losses.stablerep import StableRepLoss

__all__ = ["StableRepLoss", "image_text_contrastive_loss", "multi_positive_contrastive_loss"]
