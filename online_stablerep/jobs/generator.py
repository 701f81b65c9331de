"""A generator rank's job: make caption groups and send them to trainer ranks under credit.

Cursor records (transport.protocol.Cursor): every batch sent carries where the producer's
stream stands: the call number, groups of that call delivered so far, groups the call made, the
producer state before the call and, once the call is fully delivered, after it. Trainers
checkpoint the newest record they received; on resume each trainer sends its record (RESUME) and
the generator continues from the newest one: after the call if it was fully delivered, else it
redoes the call and drops the groups already delivered. So no group a trainer received is made
again, and what a resume loses is only what sat unused in trainer buffers (or in flight) at the
checkpoint.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from online_stablerep.config.schema import Config
from online_stablerep.distributed.groups import JobGroups
from online_stablerep.monitoring.metrics import console
from online_stablerep.producers.base import Producer
from online_stablerep.transport.protocol import Cursor
from online_stablerep.transport.sender import GeneratorLink

# Seconds between the generator's console lines.
LOG_EVERY_S = 30.0


def run_generator(
    cfg: Config, groups: JobGroups, make_producer: Callable[[], Producer],
    stop: threading.Event | None = None,
) -> int:
    """Feed the trainer ranks until they stop, the caption stream ends, or `stop` is set;
    returns 0.

    Args:
        make_producer: builds this rank's producer. Called inside the failure path, so a bad
            caption corpus reaches the trainers as FAIL with its reason.
        stop: set by SIGTERM/SIGINT: the generator ends its stream (END), as at the end of the
            captions, and waits for the trainers' STOP.

    Raises:
        TransportError: a trainer failed, aborted, or stopped answering (names the rank).
        Exception: whatever the producer raised; trainers were told with FAIL first.
    """
    rank = groups.rank
    link = GeneratorLink(groups, cfg.transport.timeout_s, cfg.transport.startup_timeout_s)
    link.interrupt = stop
    sent: list[list[int]] = []  # (caption_id, epoch, rank) of every group sent (train.audit)
    totals = {"groups": 0, "images": 0}  # sent, for the closing line (benchmarks/soak.py)
    producer: Producer | None = None
    try:
        producer = make_producer()
        # 1. Where the stream starts: fresh, or after the newest group any trainer received.
        resume = link.wait_hello()
        seq, skip = 0, 0
        if resume is not None:
            cursor = Cursor.from_dict(resume)
            state, seq, skip = cursor.resume_point()
            producer.load_state_dict(state)
            console(f"resuming the caption stream after call {cursor.seq} "
                    f"(group {cursor.end} of {cursor.length})", role="generator", rank=rank)
        producer.start()
        # Groups the producer gave up after a recoverable error (out of memory, non-finite
        # images), by cause: only the diffusion producer has such errors to recover from.
        skipped: dict[str, int] = getattr(producer, "skipped", {})
        t0 = last_log = time.monotonic()
        images = 0
        while True:
            # 2. Produce only while some trainer has room: credit bounds every buffer.
            if not link.wait_credit():
                break
            if stop is not None and stop.is_set():
                console("stopping on a signal: END sent", role="generator", rank=rank)
                link.finish()
                return 0
            before = producer.state_dict()
            made = producer.next_groups()
            if not made:
                console("caption stream ended (train.epochs): END sent", role="generator",
                        rank=rank)
                link.finish()
                return 0
            seq += 1
            after = producer.state_dict()
            images += sum(g.num_images for g in made)
            # 3. Send in parts as credit allows, each to the trainer holding the most credit.
            offset, skip = skip, 0
            while offset < len(made):
                taken = link.take_credit(len(made) - offset)
                if taken is None:
                    break
                trainer, count = taken
                part = made[offset : offset + count]
                offset += count
                if cfg.train.audit:
                    sent.extend([g.caption_id, g.epoch, g.producer_rank] for g in part)
                totals["groups"] += len(part)
                totals["images"] += sum(g.num_images for g in part)
                elapsed = max(time.monotonic() - t0, 1e-9)
                cursor = Cursor(seq, offset, len(made), before,
                                after if offset == len(made) else None)
                link.send(trainer, part, {"cursor": cursor.to_dict(),
                                          "images_per_s": images / elapsed,
                                          "idle_fraction": link.idle_s / elapsed,
                                          "skipped": sum(skipped.values())})
            # 4. A console line every so often.
            now = time.monotonic()
            if now - last_log >= LOG_EVERY_S:
                elapsed = now - t0
                console(f"{images / elapsed:.1f} img/s, idle {link.idle_s / elapsed:.0%} "
                        f"(waiting for credit), {images} images"
                        + (f", groups skipped after errors: {skipped}" if any(skipped.values())
                           else ""), role="generator", rank=rank)
                last_log = now
        console("every trainer stopped: exiting", role="generator", rank=rank)
        link.close()
        return 0
    except BaseException as err:
        link.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        console(f"sent {totals['groups']} groups ({totals['images']} images) in all",
                role="generator", rank=rank)
        if producer is not None:
            producer.close()
        if cfg.train.audit:
            path = Path(cfg.output_dir) / "audit" / f"generator_rank{rank}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"rank": rank, "sent": sent}))
