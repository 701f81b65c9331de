"""DeepCache-style feature reuse across sampling steps (Ma et al., arXiv 2312.00858).

Adjacent denoising steps change the UNet's deep, low-resolution features little. A full step
runs the whole UNet and keeps the input of its last (highest-resolution) up block, which carries
everything the deeper blocks computed; a cached step runs only the shallow path, `conv_in`, the
first down block and the last up block, with that kept feature in place of the deep ones.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel


class DeepCacheUNet(torch.nn.Module):
    """A diffusers UNet2DConditionModel whose forward can skip its deep blocks.

    `forward(..., cached=None)` is the full UNet and returns (eps, feature); with `cached` set
    to a feature of an earlier full call at the same batch shape, it runs only the shallow path
    and returns (eps, None). The full path follows UNet2DConditionModel.forward for the SD
    1.x/2.x/XL configurations (no ControlNet or adapter residuals, no attention masks).
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        assert len(unet.up_blocks) >= 2, "DeepCache needs at least two up blocks"
        self.unet = unet
        self.config = unet.config

    def _embed(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
               timestep_cond: torch.Tensor | None,
               added_cond_kwargs: dict[str, torch.Tensor] | None) -> torch.Tensor:
        u = self.unet
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug if aug is not None else emb
        return u.time_embed_act(emb) if u.time_embed_act is not None else emb

    @staticmethod
    def _block(block: torch.nn.Module, hidden: torch.Tensor, emb: torch.Tensor,
               context: torch.Tensor, **kwargs: Any) -> Any:
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=hidden, temb=emb, encoder_hidden_states=context, **kwargs)
        return block(hidden_states=hidden, temb=emb, **kwargs)

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                cached: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args as UNet2DConditionModel; `cached`: (B, C, h, w) feature of a full call.

        Returns:
            (eps (B, C, h, w), the feature to cache, or None on a cached call).
        """
        u = self.unet
        emb = self._embed(sample, timestep, encoder_hidden_states, timestep_cond,
                          added_cond_kwargs)
        hidden = u.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        blocks = u.down_blocks if cached is None else u.down_blocks[:1]
        for block in blocks:
            hidden, res = self._block(block, hidden, emb, encoder_hidden_states)
            skips += res
        feature = None
        if cached is None:
            if u.mid_block is not None:
                hidden = (u.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
                          if getattr(u.mid_block, "has_cross_attention", False)
                          else u.mid_block(hidden, emb))
            for block in u.up_blocks[:-1]:
                res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
                hidden = self._block(block, hidden, emb, encoder_hidden_states,
                                     res_hidden_states_tuple=res)
            feature = hidden
        else:
            # The shallow path's skips are conv_in's output and the first down block's layer
            # outputs; its downsampler output fed the (skipped) second up block.
            skips = skips[:len(u.up_blocks[-1].resnets)]
            hidden = cached
        last = u.up_blocks[-1]
        hidden = self._block(last, hidden, emb, encoder_hidden_states,
                             res_hidden_states_tuple=skips[-len(last.resnets):])
        if u.conv_norm_out is not None:
            hidden = u.conv_act(u.conv_norm_out(hidden))
        return u.conv_out(hidden), feature
