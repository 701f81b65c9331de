"""The replay buffer between producers and trainers: it depends only on the records, so the
transport (which fills it) and training (which draws from it) both import it, not each other."""

from online_stablerep.replay.buffer import GroupKey, ReplayBuffer, group_key

__all__ = ["GroupKey", "ReplayBuffer", "group_key"]
