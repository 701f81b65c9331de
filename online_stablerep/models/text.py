"""StableRep++'s text tower: a CLIP-like causal text transformer and CLIP's BPE tokenizer.

Both come from open_clip. Its SimpleTokenizer reads the BPE vocabulary shipped inside the
open_clip_torch package, so no download is needed.
"""

from __future__ import annotations

import functools

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer

from online_stablerep.config.schema import ModelConfig


@functools.lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    # Reading the BPE merges takes a while; one tokenizer serves every context length.
    return SimpleTokenizer()


def vocab_size() -> int:
    """Number of tokens of CLIP's BPE vocabulary (49408)."""
    return len(_tokenizer().encoder)


def tokenize(captions: list[str], context_length: int) -> torch.Tensor:
    """(n, context_length) int64 token ids of `captions`: start token, BPE tokens, end token,
    zero padding; captions longer than the context are cut (the end token is kept)."""
    return _tokenizer()(captions, context_length=context_length).long()


# model.text_activation -> the MLP activation of each text block.
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"quick_gelu": QuickGELU, "gelu": torch.nn.GELU}


def build_text_tower(model_cfg: ModelConfig) -> TextTransformer:
    """Random-init text transformer mapping (n, context_length) tokens to (n, image_text_dim).

    Width, layers, heads, context and activation come from model_cfg; the end-of-text token's
    feature goes through a bias-free linear projection to model_cfg.image_text_dim, the space
    the image projection maps to (official StableRepMM: 12 layers, width 512, QuickGELU, 512).
    """
    return TextTransformer(
        context_length=model_cfg.text_context_length,
        vocab_size=vocab_size(),
        width=model_cfg.text_width,
        heads=model_cfg.text_heads,
        layers=model_cfg.text_layers,
        output_dim=model_cfg.image_text_dim,
        act_layer=ACTIVATIONS[model_cfg.text_activation],
    )
