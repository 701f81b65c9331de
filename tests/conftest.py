"""Fixtures shared across test files: expensive objects built once per session. Tests must not
modify what they get from here."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_fp32_components():
    """The random-weight `tiny` diffusion architecture in fp32 on the CPU (a few seconds to build
    on 2 cores): for tests that read its modules or save artefacts of its architecture."""
    from online_stablerep.config.schema import GeneratorConfig
    from online_stablerep.producers.pipeline import build_components

    return build_components(GeneratorConfig(model="tiny", dtype="fp32"), "cpu")
