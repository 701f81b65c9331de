"""The toy model's components (diffusers' and transformers' own classes) and the classifier that
measures its samples.

Sizes are set by what a 2-core CPU (shared) trains in about an hour and by the size of the shipped folder:
32 px images, a 4x16x16 latent (a two-block AutoencoderKL), a three-level UNet, and a 32-wide
two-layer CLIP text encoder (its 49,408-token embedding is most of its size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from online_stablerep.producers.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE
from online_stablerep.toy.world import TOY_CATEGORIES, TOY_RESOLUTION

TEXT_WIDTH = 32

# v-prediction on a cosine schedule: the cosine schedule keeps a 16x16 latent from being almost
# clean for most timesteps, and v-prediction stays well posed near pure noise, where few-step
# samplers start ("trailing" spacing starts them at the last timestep).
TOY_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
}


def build_vae() -> AutoencoderKL:
    """32 px RGB <-> 4x16x16 latent."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, sample_size=TOY_RESOLUTION, norm_num_groups=8,
    )


def build_unet() -> UNet2DConditionModel:
    """A 16x16 latent UNet, cross-attention at 8x8 and 4x4."""
    return UNet2DConditionModel(
        sample_size=TOY_RESOLUTION // 2, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=16,
    )


def build_text_encoder() -> CLIPTextModel:
    """A CLIP text encoder over CLIP's full vocabulary (the project's offline tokenizer)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, layer_norm_eps=1e-5,
    ))


def build_parts() -> dict[str, Any]:
    """Untrained toy modules, as `producers.architectures` builds its named architectures."""
    return {"unet": build_unet(), "vae": build_vae(), "text_encoder": build_text_encoder()}


class CategoryClassifier(nn.Module):
    """A small CNN labelling 32 px images by toy category (trained on real renders only)."""

    def __init__(self, num_classes: int = TOY_CATEGORIES, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True), nn.Conv2d(out, out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, num_classes) logits."""
        x = self.features(images * 2 - 1)
        return self.fc(x.mean(dim=(2, 3)))


@torch.inference_mode()
def classify(classifier: CategoryClassifier, images_uint8: torch.Tensor) -> torch.Tensor:
    """(B,) predicted categories of (B, 3, H, W) uint8 images, resized to the toy resolution."""
    x = images_uint8.float() / 255
    if x.shape[-1] != TOY_RESOLUTION:
        x = nn.functional.interpolate(x, size=(TOY_RESOLUTION, TOY_RESOLUTION), mode="bilinear",
                                      antialias=True, align_corners=False)
    classifier.eval()
    return torch.cat([classifier(chunk).argmax(1) for chunk in x.split(256)])


def load_classifier(folder: str | Path) -> CategoryClassifier:
    """The classifier saved next to a toy model (`classifier.safetensors`, fp16) in eval mode."""
    state = load_file(str(Path(folder) / "classifier.safetensors"))
    model = CategoryClassifier()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()
