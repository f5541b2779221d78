"""Training input pipeline throughput on natural images: tailaug's natural pipeline against
a plain torchvision ImageFolder DataLoader.

Generates (once; cached in benchmarks/out/loader_speed/images/) 20,000 JPEGs of 500x375
(smooth random content: noise at three scales upsampled and summed, JPEG quality 90) in
1,000 class folders, then measures images/s of

- tailaug: ``data.transforms: natural`` (RandomResizedCrop 224, flip, colour jitter 0.4 in
  the loader workers), iterated as stage 1 consumes it: ``Batches.raw()``, uint8 batches on
  the device (normalisation, one on-device op, is left out); with CUDA also
  ``data.gpu_decode`` (JPEGs decoded and augmented on the GPU);
- torchvision: ``ImageFolder`` + ``RandomResizedCrop(224)``, ``RandomHorizontalFlip``,
  ``ColorJitter(0.4, 0.4, 0.4, 0)``, ``ToTensor``, ``Normalize`` in a DataLoader, each batch
  moved to the device;

both with batches of 128, 0, 1 and 2 workers, persistent workers, prefetch factor 4, pinned
memory on CUDA. Each setting times ``--batches`` batches after one warm-up batch (which
starts the workers); the images are read again (next epoch) when a setting needs more
batches than ``--images`` holds. Writes benchmarks/out/loader_speed.json and .md and
prints the table.

    .venv/bin/python benchmarks/loader_speed.py [--images 20000] [--batches 20] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the tailaug command runs (idle threads sleep)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).parent
OUT = HERE / "out"
IMAGES = OUT / "loader_speed" / "images"
CLASSES, WIDTH, HEIGHT, QUALITY = 1000, 500, 375, 90
SIZE, BATCH, PREFETCH = 224, 128, 4
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_path(i: int) -> Path:
    return IMAGES / f"c{i % CLASSES:04d}" / f"{i:05d}.jpg"


def smooth_image(rng: np.random.Generator) -> Image.Image:
    """500 x 375 RGB: uniform noise at 8x6, 32x24 and 125x94, each upsampled (bicubic), summed."""
    total = np.zeros((HEIGHT, WIDTH, 3))
    for (w, h), weight in (((8, 6), 0.6), ((32, 24), 0.3), ((125, 94), 0.1)):
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        total += weight * np.asarray(noise.resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.clip(total, 0, 255).astype(np.uint8))


def ensure_images(n: int) -> list[Path]:
    """The first ``n`` images of the cache, written where missing (image i in class i mod 1,000)."""
    paths = [image_path(i) for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        print(f"writing {len(missing)} JPEGs of {WIDTH}x{HEIGHT} to {IMAGES} (once) ...", flush=True)
        t0 = time.perf_counter()
        for i in missing:
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[i].with_suffix(".tmp")
            smooth_image(np.random.default_rng(i)).save(tmp, format="JPEG", quality=QUALITY)
            tmp.replace(paths[i])
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def forever(make_epoch):
    """Batches of epoch 0, 1, ... one after the other."""
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def tailaug_batches(paths, workers: int, device: torch.device, gpu_decode: bool = False):
    from tailaug.data.datasets import Split
    from tailaug.data.loaders import Batches
    from tailaug.data.natural import NaturalTransform
    from tailaug.data.sources import ImageFolderDataset
    from tailaug.data.transforms import BatchTransform

    labels = np.arange(len(paths)) % CLASSES
    ds = ImageFolderDataset(paths, labels, SIZE, natural=NaturalTransform(SIZE), gpu_decode=gpu_decode)
    order = np.random.default_rng(0).permutation(len(paths))
    batches = Batches(Split(labels, dataset=ds), BATCH, BatchTransform(MEAN, STD, 0, False), device, order=order,
                      augment=True, seed=0, num_workers=workers, prefetch_factor=PREFETCH, drop_last=True)

    def epoch(e):
        batches.set_epoch(e)
        for images, _, _ in batches.raw():
            yield images

    return forever(epoch)


def torchvision_batches(paths, workers: int, device: torch.device):
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    transform = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0),
                           T.ToTensor(), T.Normalize(MEAN, STD)])
    wanted = {str(p) for p in paths}
    ds = tvd.ImageFolder(str(IMAGES), transform=transform, is_valid_file=lambda p: p in wanted, allow_empty=True)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=PREFETCH if workers > 0 else None, drop_last=True,
        generator=torch.Generator().manual_seed(0))

    def epoch(_):
        for images, _ in loader:
            yield images.to(device, non_blocking=True)

    return forever(epoch)


def measure(batches, count: int, device: torch.device) -> float:
    """Images/s over ``count`` batches after one warm-up batch."""
    next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(count):
        images = next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert images.shape == (BATCH, 3, SIZE, SIZE)
    return count * BATCH / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="images to use (default 20,000)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches of 128 per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if args.images < BATCH:
        parser.error(f"--images must be at least one batch ({BATCH})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = ensure_images(args.images)
    mean_kb = float(np.mean([p.stat().st_size for p in paths[:500]])) / 1024
    pipelines = {"tailaug natural": lambda w: tailaug_batches(paths, w, device),
                 "torchvision ImageFolder": lambda w: torchvision_batches(paths, w, device)}
    if device.type == "cuda":
        pipelines["tailaug natural + gpu_decode"] = lambda w: tailaug_batches(paths, w, device, gpu_decode=True)
    rows = []
    for workers in args.workers:
        for name, make in pipelines.items():
            ips = measure(make(workers), args.batches, device)
            rows.append({"pipeline": name, "workers": workers, "images_per_s": ips})
            print(f"{name:30s} workers {workers}: {ips:8.1f} images/s", flush=True)
    result = {
        "images": args.images, "timed_batches": args.batches, "batch_size": BATCH, "image_size": SIZE,
        "source": f"{WIDTH}x{HEIGHT} JPEG q{QUALITY}, mean {mean_kb:.0f} KiB", "device": str(device),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch": torch.__version__, "main_threads": torch.get_num_threads(), "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "loader_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    names = list(pipelines)
    lines = [f"Training input pipeline, batches of {BATCH} at {SIZE}x{SIZE} from {result['source']}, "
             f"{args.images} images, {args.batches} timed batches, device {device} ({os.cpu_count()} cores), "
             "images/s:", "", "| workers | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for workers in args.workers:
        cells = [next(r["images_per_s"] for r in rows if r["pipeline"] == n and r["workers"] == workers)
                 for n in names]
        lines.append(f"| {workers} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
    table = "\n".join(lines) + "\n"
    (OUT / "loader_speed.md").write_text(table)
    print("\n" + table + f"\nwrote {OUT / 'loader_speed.json'} and {OUT / 'loader_speed.md'}")


if __name__ == "__main__":
    main()
