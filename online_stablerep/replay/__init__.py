"""The replay buffer between producers and trainers: it depends only on the records (and the
config's list of draws), so training fills it from a producer or from the transport, which sees
it only through transport.sink.GroupSink."""

from online_stablerep.replay.buffer import GroupKey, ReplayBuffer, group_key

__all__ = ["GroupKey", "ReplayBuffer", "group_key"]
