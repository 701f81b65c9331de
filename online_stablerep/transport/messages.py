"""The messages between trainer and generator ranks, and the gloo point-to-point calls that
carry them, with every wait bounded and every failure named by peer rank.

Every message is a fixed-size int64 tensor [kind, arg0, arg1] sent with TAG_MESSAGE, so a rank
can receive it from any peer (gloo's recv with src=None); what follows it (a data batch's header
and payload, a blob of bytes) comes from that same peer under its own tag.

Direction and group:
- trainer -> generator on `JobGroups.control`: START, RESUME(blob), CREDIT(n), KEEPALIVE,
  STOP(blob: empty for a clean stop, else the reason the trainer aborts).
- generator -> trainer on `JobGroups.data_plane`: DATA(header, payload), KEEPALIVE, END, FAIL(blob).

Gloo poisons a whole group when a wait times out, so no wait here ever times out in normal
operation: peers send KEEPALIVE every `keepalive_interval(timeout_s)` seconds (peers on other
nodes of a K/node layout every `remote_keepalive_interval`), and a timeout means that every
peer the wait could be answered by has gone silent.
"""

from __future__ import annotations

import enum
from datetime import timedelta

import torch
import torch.distributed as dist

MESSAGE_LEN = 3
TAG_MESSAGE = 1
TAG_HEADER = 2
TAG_PAYLOAD = 3
TAG_BLOB = 4


class Kind(enum.IntEnum):
    START = 1
    RESUME = 2
    CREDIT = 3
    KEEPALIVE = 4
    STOP = 5
    DATA = 6
    END = 7
    FAIL = 8


class TransportError(RuntimeError):
    """A peer failed, closed its connection, or stopped answering; the message names it."""


def keepalive_interval(timeout_s: float) -> float:
    """Seconds between keepalives: often enough that a live peer is never mistaken for a dead
    one, rarely enough to cost nothing."""
    return min(5.0, timeout_s / 4)


def remote_keepalive_interval(timeout_s: float) -> float:
    """Seconds between keepalives to a peer on another node when generators keep to their own
    node (K/node): such a peer hears nothing else, so these keep it from being taken for dead,
    at a twelfth of the fan-in at the default timeout (at 1,000 ranks a trainer would otherwise
    hear from every generator every 5 s: docs/performance.md, "Scale: 1,000 GPUs")."""
    return max(keepalive_interval(timeout_s), timeout_s / 3)


def _wait(work: dist.Work, timeout_s: float) -> None:
    work.wait(timeout=timedelta(seconds=timeout_s))


def send_message(
    group: dist.ProcessGroup, dst: int, kind: Kind, *args: int, blob: bytes = b"",
    timeout_s: float,
) -> None:
    """Send one message (and its blob, if any) to global rank `dst`.

    Raises:
        RuntimeError: gloo's error when the peer is gone or the send times out.
    """
    values = [int(kind), *args, 0, 0][:MESSAGE_LEN]
    if blob:
        values[1] = len(blob)
    _wait(dist.isend(torch.tensor(values, dtype=torch.int64), dst, group=group, tag=TAG_MESSAGE),
          timeout_s)
    if blob:
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        _wait(dist.isend(data, dst, group=group, tag=TAG_BLOB), timeout_s)


def recv_message(
    group: dist.ProcessGroup, src: int | None, timeout_s: float
) -> tuple[int, Kind, list[int]]:
    """Receive one message from `src` (None: from any peer): (sender rank, kind, args)."""
    buf = torch.zeros(MESSAGE_LEN, dtype=torch.int64)
    work = dist.irecv(buf, src=src, group=group, tag=TAG_MESSAGE)
    _wait(work, timeout_s)
    # As torch's own recv does: the group-local sender rank, mapped to the global rank.
    sender = src if src is not None else dist.get_global_rank(group, work._source_rank())
    values = buf.tolist()
    return sender, Kind(values[0]), values[1:]


def recv_blob(group: dist.ProcessGroup, src: int, nbytes: int, timeout_s: float) -> bytes:
    """The blob that follows a message whose first arg is its length."""
    if nbytes == 0:
        return b""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    _wait(dist.irecv(buf, src=src, group=group, tag=TAG_BLOB), timeout_s)
    return buf.numpy().tobytes()


def send_data(
    group: dist.ProcessGroup, dst: int, header: torch.Tensor, payload: torch.Tensor,
    timeout_s: float,
) -> None:
    """DATA: the message with both sizes, then the wire header and payload."""
    message = torch.tensor([Kind.DATA, header.numel(), payload.numel()], dtype=torch.int64)
    _wait(dist.isend(message, dst, group=group, tag=TAG_MESSAGE), timeout_s)
    _wait(dist.isend(header, dst, group=group, tag=TAG_HEADER), timeout_s)
    _wait(dist.isend(payload, dst, group=group, tag=TAG_PAYLOAD), timeout_s)


def recv_data(
    group: dist.ProcessGroup, src: int, args: list[int], timeout_s: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The wire header and payload of a DATA message received from `src`."""
    header = torch.empty(args[0], dtype=torch.int64)
    payload = torch.empty(args[1], dtype=torch.uint8)
    _wait(dist.irecv(header, src=src, group=group, tag=TAG_HEADER), timeout_s)
    _wait(dist.irecv(payload, src=src, group=group, tag=TAG_PAYLOAD), timeout_s)
    return header, payload


def describe_failure(err: BaseException) -> str:
    """gloo's error in words a user can act on."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Connection closed" in text or "Connection reset" in text or "Broken pipe" in text:
        return f"connection closed (the process died or was killed; gloo: {text})"
    if "Timed out" in text or "timed out" in text:
        return f"stopped answering (gloo: {text})"
    return text
