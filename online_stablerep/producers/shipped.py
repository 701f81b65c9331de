"""Trained models and adapters shipped inside the package, by name; they load like any diffusers
folder.

Kept apart from pipeline.py so that input checks can resolve a name without importing diffusers.
"""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parent.parent / "data"

SHIPPED_MODELS: dict[str, Path] = {
    "toy": _DATA / "toy_sd",
}

# Few-step students of the shipped models, by the name generator.lora takes: diffusers LoRA
# folders, loaded with `load_lora_weights` as a released LCM-LoRA is.
SHIPPED_ADAPTERS: dict[str, Path] = {
    "toy-lcm-lora": _DATA / "toy_lcm_lora",
}
