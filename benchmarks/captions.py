"""Memory and speed of a large caption corpus: the lazy index every generator rank keeps,
beside loading the whole corpus into a Python list (what the index avoids).

    python benchmarks/captions.py                 # 10M lines (~0.6 GB of text in a temp dir)
    python benchmarks/captions.py --lines 100000

Each side runs in a fresh process so resident memory is measured cleanly. Writes
benchmarks/results/captions-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import machine_name  # noqa: E402

WORDS = ("a photo of the red blue small large dog cat car house tree river street city man woman "
         "child sitting running on in under near with at night day sunny old new wooden").split()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_corpus(path: Path, lines: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(lines):
            f.write(" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + "\n")
    return path.stat().st_size


def _lazy(path: str, queue: mp.Queue) -> None:
    from online_stablerep.config.schema import CaptionsConfig
    from online_stablerep.producers.captions import CaptionSource

    before = _rss_mb()
    t0 = time.perf_counter()
    source = CaptionSource.open(CaptionsConfig(path=path))
    index_s = time.perf_counter() - t0
    after = _rss_mb()
    rng = random.Random(1)
    ids = [rng.randrange(len(source)) for _ in range(20000)]
    t0 = time.perf_counter()
    for i in ids:
        source.get(i)
    get_us = (time.perf_counter() - t0) / len(ids) * 1e6
    queue.put({"captions": len(source), "index_s": index_s, "rss_growth_mb": after - before,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "random_get_us": get_us})


def _whole(path: str, queue: mp.Queue) -> None:
    before = _rss_mb()
    t0 = time.perf_counter()
    with open(path) as f:
        captions = [line.rstrip("\n") for line in f]
    queue.put({"captions": len(captions), "load_s": time.perf_counter() - t0,
               "rss_growth_mb": _rss_mb() - before,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _in_process(target, path: Path) -> dict:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=target, args=(str(path), queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000_000)
    parser.add_argument("--device", default="cpu", help="accepted for run_all.sh; unused")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="captions-bench-") as tmp:
        path = Path(tmp) / "corpus.txt"
        t0 = time.perf_counter()
        size = write_corpus(path, args.lines)
        print(f"wrote {args.lines} captions, {size / 1e6:.0f} MB, in {time.perf_counter() - t0:.0f} s")
        lazy = _in_process(_lazy, path)
        whole = _in_process(_whole, path)
    result = {"machine": machine_name(torch.device("cpu")), "lines": args.lines,
              "corpus_mb": size / 1e6, "lazy_index": lazy, "whole_list": whole,
              "memory_ratio_whole_over_lazy": whole["rss_growth_mb"] / max(lazy["rss_growth_mb"], 1e-9)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"captions-{result['machine']}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"lazy index: +{lazy['rss_growth_mb']:.0f} MB resident, {lazy['index_s']:.0f} s to "
          f"index, {lazy['random_get_us']:.0f} us per random caption; whole list: "
          f"+{whole['rss_growth_mb']:.0f} MB -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
