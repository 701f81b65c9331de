"""Faults injected into a real job, for tests only: `ONLINE_STABLEREP_INJECT` in a rank's
environment, as comma-separated `key=value` pairs, e.g.

    ONLINE_STABLEREP_INJECT=oom_above=2,nonfinite_caption=3

- `oom_above=N`: a diffusion producer call of more than N captions raises
  torch.OutOfMemoryError (as a GPU would at too large a batch): the producer retries in halves.
- `oom_caption=ID`: any call holding caption id ID raises it: the group is skipped and counted.
- `nonfinite_caption=ID`: the images of caption id ID come out NaN before their conversion to
  uint8, as a diverged sampler would make them: the group is skipped and counted.
- `checkpoint_delay_s=S`: every trainer rank sleeps S seconds inside each checkpoint write, after
  its state is taken (a slow disk): generation goes on meanwhile.
- `step_delay_s=S`: every trainer step takes S seconds longer (a slower device), so a test can
  kill a run at a random moment before it ends on a fast machine.

Unset (the default, and always outside tests) nothing is injected. An unknown key fails at once,
so a test cannot silently inject nothing.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

ENV = "ONLINE_STABLEREP_INJECT"


@dataclass(frozen=True)
class InjectedFaults:
    """What this process injects (every field off by default)."""

    # A producer call of more captions than this raises an out-of-memory error (0: never).
    oom_above: int = 0
    # A producer call holding this caption id raises an out-of-memory error (-1: never).
    oom_caption: int = -1
    # This caption id's images come out non-finite (-1: never).
    nonfinite_caption: int = -1
    # Seconds each checkpoint write is delayed by (0: none).
    checkpoint_delay_s: float = 0.0
    # Seconds each trainer step is delayed by (0: none).
    step_delay_s: float = 0.0

    def oom(self, caption_ids: list[int]) -> bool:
        """Whether a producer call of these captions is to fail as out of memory."""
        return (0 < self.oom_above < len(caption_ids)) or self.oom_caption in caption_ids


def injected() -> InjectedFaults:
    """The faults named in `ONLINE_STABLEREP_INJECT` (none when it is unset).

    Raises:
        ValueError: an unknown key or a malformed pair (names it).
    """
    text = os.environ.get(ENV, "").strip()
    if not text:
        return InjectedFaults()
    kinds = {f.name: f.type for f in dataclasses.fields(InjectedFaults)}
    values = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or key not in kinds:
            raise ValueError(f"{ENV}: {pair!r} is not one of {', '.join(f'{k}=...' for k in kinds)}")
        values[key] = float(value) if kinds[key] == "float" else int(value)
    return InjectedFaults(**values)
