"""An offline CLIP tokenizer with the real 49,408-token vocabulary.

Random-weight architectures have no checkpoint to load a tokenizer from and the machine may have no
network. open_clip_torch ships the BPE merges CLIP was trained with; from them we write the
`vocab.json` + `merges.txt` pair that `transformers.CLIPTokenizer` reads. The vocabulary size is
checked afterwards because a tokenizer built from missing or wrong files can silently come back
with only its special tokens.
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

from online_stablerep import atomic

# CLIP's vocabulary: 256 byte tokens + 256 end-of-word byte tokens + 48,894 merges + 2 specials.
CLIP_VOCAB_SIZE = 49408
# Text tokens CLIP's text encoders attend over (start and end tokens included).
CLIP_MAX_LENGTH = 77
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


def default_cache_dir() -> Path:
    """Where the tokenizer files are written once (`$XDG_CACHE_HOME/online_stablerep/...`)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "online_stablerep" / "clip_tokenizer"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _write_vocab_files(cache_dir: Path) -> None:
    bpe_path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    with bpe_path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        # The first line is a version header; CLIP uses the first _NUM_MERGES merges after it.
        merges = f.read().split("\n")[1 : _NUM_MERGES + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = (
        byte_tokens
        + [t + "</w>" for t in byte_tokens]
        + ["".join(m.split()) for m in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written under temporary names and renamed so concurrent ranks never read half a file.
    suffix = f".{os.getpid()}.tmp"
    atomic.write_text(cache_dir / "vocab.json", json.dumps({t: i for i, t in enumerate(tokens)}),
                      suffix)
    atomic.write_text(cache_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n",
                      suffix)


def check_vocab_size(tokenizer: CLIPTokenizer, expected: int, source: str) -> None:
    """Raise ValueError when `tokenizer` does not hold `expected` tokens.

    Args:
        tokenizer: The tokenizer to check.
        expected: The vocabulary size its text encoder was built for.
        source: Where the tokenizer came from, for the error message.
    """
    if len(tokenizer) != expected:
        raise ValueError(
            f"tokenizer from {source} has {len(tokenizer)} tokens, expected {expected}: its "
            "vocabulary files are missing or wrong"
        )


def build_clip_tokenizer(cache_dir: str | Path | None = None, pad_token: str = "<|endoftext|>"
                         ) -> CLIPTokenizer:
    """CLIP's tokenizer, built offline from the merges shipped inside open_clip_torch.

    Args:
        cache_dir: Directory for vocab.json and merges.txt (default: `default_cache_dir()`).
        pad_token: "<|endoftext|>" as in SD 1.x's tokenizer, "!" as in SD 2.x's.

    Raises:
        ValueError: when the built tokenizer does not have CLIP's 49,408 tokens.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not (cache_dir / "vocab.json").is_file() or not (cache_dir / "merges.txt").is_file():
        _write_vocab_files(cache_dir)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(cache_dir), model_max_length=CLIP_MAX_LENGTH, pad_token=pad_token
    )
    check_vocab_size(tokenizer, CLIP_VOCAB_SIZE, str(cache_dir))
    return tokenizer
