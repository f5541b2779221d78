"""Peak memory and time of stage 3 on an iNaturalist-2018-sized feature cache: streamed from
the memory-mapped shards against read whole into memory first.

The cache: 437,513 training rows x 2,048 features (``--rows``, ``--dim``), random values
around a random mean per class, stored in ``--dtype`` (default float16, as
``features.dtype: float16`` stores it) in shards of ``--shard-rows`` rows; labels over 8,142
classes (``--classes``) with long-tailed counts, n_c = max(2, 1000 (c + 1)^-p) with p chosen
so that they sum to the rows (iNaturalist 2018: 1,000 down to 2 images per class), shuffled;
a test split of 1,024 rows. It is written batch by batch with the pipeline's own writer
(``stages/feature_cache.py``) under ``benchmarks/out/cache_memory/<rows>x<dim>-<dtype>-<shard rows>/``
and reused when present (the full-size float16 cache takes 1.7 GiB of disk).

Each mode runs in a fresh process (``--threads`` threads):

- ``stream``: ``load_cache`` (the shards mapped), then cRT (``retrain_classifier``, a linear
  layer of 2,048 x 8,142 with Adam, the default class-balanced sampler) on the mapped
  ``ShardedArray``: every batch of 512 is read by its row numbers and converted to float32.
- ``memory``: ``load_cache``, the training features read whole into one float32 tensor
  (``ShardedArray.tensor()``, as a cache of at most ``features.shard_rows`` rows is), then the
  same cRT on the tensor.

Stage 3 runs ``--steps`` steps of batch 512 (the first steps x 512 draws of the
class-balanced sampler's first epoch; a few hundred steps show the steady state, a full
epoch of 855 steps is not needed) after the checks every stage 3 makes (one pass over
the rows for NaN/inf). Memory: the peak resident set (VmHWM, which counts the mapped file
pages the process has touched, pages the kernel can drop at any time) and the peaks of its
anonymous and file-backed parts (RssAnon, RssFile, sampled every 10 ms), minus nothing: the
figures include Python, torch and the classifier with its Adam state (~270 MB at full size).

    .venv/bin/python benchmarks/cache_memory.py                  # full size (do not run on a busy machine)
    .venv/bin/python benchmarks/cache_memory.py --rows 20000 --dim 256 --classes 500 --shard-rows 4096 --steps 20

Writes benchmarks/out/cache_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "out"
MIB = 2**20
TEST_ROWS = 1024
BATCH = 512


def long_tail_counts(rows: int, classes: int, n_max: int = 1000, n_min: int = 2) -> np.ndarray:
    """Per-class counts max(n_min, n_max (c + 1)^-p), sorted down, summing to ``rows``."""
    if not n_min * classes <= rows <= n_max * classes:
        raise SystemExit(f"--rows must lie in {n_min * classes}..{n_max * classes} for {classes} classes")
    c = np.arange(1, classes + 1, dtype=np.float64)
    lo, hi = 0.0, 20.0
    for _ in range(100):
        p = (lo + hi) / 2
        if np.maximum(n_min, n_max * c**-p).sum() > rows:
            lo = p
        else:
            hi = p
    counts = np.maximum(n_min, np.round(n_max * c**-hi)).astype(np.int64)
    k = 0
    while counts.sum() != rows:  # rounding: one image more (or less) for the largest classes
        step = 1 if counts.sum() < rows else -1
        if counts[k] + step >= n_min:
            counts[k] += step
        k = (k + 1) % classes
    return counts


def build_cache(args) -> Path:
    """The benchmark's cache (written once, reused)."""
    import torch

    from tailaug.stages.feature_cache import INDEX, CacheWriter

    directory = OUT / "cache_memory" / f"{args.rows}x{args.dim}-{args.dtype}-{args.shard_rows}"
    if (directory / INDEX).is_file():
        print(f"reusing the cache in {directory}")
        return directory
    print(f"writing a {args.rows:,} x {args.dim:,} {args.dtype} cache in shards of {args.shard_rows:,} rows to "
          f"{directory} ...")
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    counts = long_tail_counts(args.rows, args.classes)
    labels = rng.permutation(np.repeat(np.arange(args.classes), counts))
    means = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    writer = CacheWriter(directory, args.shard_rows, args.dtype)
    for start in range(0, args.rows, 16384):
        y = labels[start : start + 16384]
        x = means[y] + rng.standard_normal((len(y), args.dim), dtype=np.float32)
        writer.add("train", {"features": torch.from_numpy(x), "labels": torch.from_numpy(y),
                             "index": torch.arange(start, start + len(y))})
    y = rng.integers(0, args.classes, TEST_ROWS)
    writer.add("test", {"features": torch.from_numpy(means[y] + rng.standard_normal((TEST_ROWS, args.dim),
                                                                                      dtype=np.float32)),
                        "labels": torch.from_numpy(y), "logits": torch.zeros(TEST_ROWS, args.classes)})
    writer.finish({"class_counts": torch.from_numpy(counts), "head_weight": torch.zeros(args.classes, args.dim),
                   "head_bias": torch.zeros(args.classes)})
    print(f"written in {time.perf_counter() - t0:.0f} s")
    return directory


# --------------------------------------------------------------------------- one mode, in its own process


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in bytes ({} without /proc)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Peaks(threading.Thread):
    """The largest RssAnon and RssFile seen, sampled every 10 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            for key, value in status().items():
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], value)
            time.sleep(0.01)


def child(mode: str, directory: Path, steps: int) -> dict:
    import torch

    from tailaug.config import RetrainConfig
    from tailaug.stages import classifier
    from tailaug.stages.feature_cache import load_cache

    peaks = Peaks()
    peaks.start()
    start = status()
    marks = {}

    class FirstDraws:
        """The first ``steps`` batches' draws of the real (class-balanced) sampler."""

        def __init__(self, sampler):
            self.sampler = sampler

        def set_epoch(self, epoch):
            self.sampler.set_epoch(epoch)

        def __iter__(self):
            marks.setdefault("steps", time.perf_counter())
            return itertools.islice(iter(self.sampler), steps * BATCH)

    real = classifier.build_sampler
    classifier.build_sampler = lambda *a, **k: FirstDraws(real(*a, **k))
    t0 = time.perf_counter()
    cache = load_cache(directory)
    x, y, counts = cache["train_features"], cache["train_labels"], cache["class_counts"]
    t1 = time.perf_counter()
    if mode == "memory":
        x = x.tensor()
    t2 = time.perf_counter()
    cfg = RetrainConfig(method="crt", epochs=1, batch_size=BATCH, lr=1e-3)
    model = classifier.retrain_classifier(x, y, counts, cfg, num_classes=len(counts), seed=0, progress=False)
    t3 = time.perf_counter()
    peaks.stopped.set()
    peaks.join()
    end = status()
    return {
        "mode": mode, "open_s": t1 - t0, "read_whole_s": t2 - t1, "checks_s": marks["steps"] - t2,
        "steps_s": t3 - marks["steps"], "steps": steps, "loss": model.history[-1]["loss"],
        "start_rss": start.get("VmRSS", 0), "start_anon": start.get("RssAnon", 0),
        "start_file": start.get("RssFile", 0), "peak_rss": end.get("VmHWM", 0) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon": peaks.peak["RssAnon"], "peak_file": peaks.peak["RssFile"], "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- report


def markdown(out: dict) -> str:
    c = out["cache"]
    lines = [f"# cache_memory: stage 3 on a {c['rows']:,} x {c['dim']:,} cache ({c['classes']:,} classes, {c['dtype']}, "
             f"{c['shards']} shards of {c['shard_rows']:,} rows, {c['bytes'] / MIB:,.0f} MiB on disk)", "",
             f"cRT, {out['steps']} steps of batch {BATCH}, {out['threads']} threads; {out['machine']}", "",
             "Memory in MiB; in brackets: after the imports, before the cache is opened.", "",
             "| mode | peak RSS (VmHWM) | peak anonymous | peak file-backed | open | read whole | "
             "checks | steps | ms/step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["modes"]:
        lines.append(f"| {r['mode']} | {r['peak_rss'] / MIB:,.0f} ({r['start_rss'] / MIB:,.0f}) | "
                     f"{r['peak_anon'] / MIB:,.0f} ({r['start_anon'] / MIB:,.0f}) | "
                     f"{r['peak_file'] / MIB:,.0f} ({r['start_file'] / MIB:,.0f}) | {r['open_s']:.2f} s | "
                     f"{r['read_whole_s']:.2f} s | {r['checks_s']:.2f} s | {r['steps_s']:.1f} s | "
                     f"{1000 * r['steps_s'] / r['steps']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=437_513)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=8142)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--shard-rows", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="stream,memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.child_dir), args.steps)))
        return
    directory = build_cache(args)
    index = json.loads((directory / "index.json").read_text())["arrays"]["train_features"]
    modes = []
    for mode in args.modes.split(","):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        run = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
                              "--child-dir", str(directory)], env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"the {mode} run failed:\n{run.stderr}")
        modes.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"{mode}: peak RSS {modes[-1]['peak_rss'] / MIB:,.0f} MiB, {modes[-1]['steps_s']:.1f} s of steps")
    out = {"cache": {"rows": args.rows, "dim": args.dim, "classes": args.classes, "dtype": args.dtype,
                     "shard_rows": args.shard_rows, "shards": len(index["shards"]),
                     "bytes": sum(s["bytes"] for s in index["shards"]), "directory": str(directory)},
           "steps": args.steps, "threads": args.threads, "modes": modes,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
                      f"{platform.python_version()}"}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cache_memory.json").write_text(json.dumps(out, indent=2) + "\n")
    (OUT / "cache_memory.md").write_text(markdown(out))
    print(markdown(out))
    print(f"written to {OUT / 'cache_memory.json'} and .md")


if __name__ == "__main__":
    main()
