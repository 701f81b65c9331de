"""Trained models shipped inside the package, by name; they load like any diffusers folder.

Kept apart from pipeline.py so that input checks can resolve a name without importing diffusers.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODELS: dict[str, Path] = {
    "toy": Path(__file__).resolve().parent.parent / "data" / "toy_sd",
}
