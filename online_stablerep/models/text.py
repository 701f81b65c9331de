"""StableRep++'s text tower: a CLIP-like causal text transformer and CLIP's BPE tokenizer.

Both come from open_clip. Its SimpleTokenizer reads the BPE vocabulary shipped inside the
open_clip_torch package, so no download is needed.
"""

from __future__ import annotations

import functools

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer

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


def build_text_tower(model_cfg: ModelConfig) -> TextTransformer:
    """Random-init text transformer mapping (n, context_length) tokens to (n, embed_dim).

    Width, layers, heads and context come from model_cfg; the output is projected to
    model_cfg.embed_dim so it lives in the image embedding's space.
    """
    return TextTransformer(
        context_length=model_cfg.text_context_length,
        vocab_size=vocab_size(),
        width=model_cfg.text_width,
        heads=model_cfg.text_heads,
        layers=model_cfg.text_layers,
        output_dim=model_cfg.embed_dim,
    )
