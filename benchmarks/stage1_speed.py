"""Stage-1 training throughput of ResNet-32 on Fashion-MNIST-LT-shaped batches on this machine.

Measures images/s of forward + backward + SGD step at batch 128 (1x28x28 uint8 batches
augmented on the fly, as in training) for float32, channels_last, and channels_last with
bfloat16 autocast. Writes benchmarks/results/stage1_speed.json and prints a table.

    .venv/bin/python benchmarks/stage1_speed.py [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tailaug.config import ModelConfig
from tailaug.data.transforms import BatchTransform
from tailaug.engine.device import autocast, cpu_autocast_dtype, cpu_flags
from tailaug.engine.seed import torch_generator
from tailaug.models import build_model

SETTINGS = {
    "float32": dict(channels_last=False, dtype=None),
    "channels_last": dict(channels_last=True, dtype=None),
    "channels_last+bf16": dict(channels_last=True, dtype=torch.bfloat16),
}


def measure(channels_last: bool, dtype, steps: int, batch: int, warmup: int = 5) -> float:
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(ModelConfig(arch="resnet32"), 10, 1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    transform = BatchTransform((0.286,), (0.353,), 4, True, channels_last)
    raw = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (batch,))
    gen = torch_generator(0)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x = transform(raw, gen)
        with autocast(device, dtype):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: measure(steps=args.steps, batch=args.batch, **kw) for name, kw in SETTINGS.items()}
    auto = "channels_last+bf16" if cpu_autocast_dtype(cpu_flags()) is not None else "channels_last"
    out = {"threads": args.threads, "batch": args.batch, "steps": args.steps, "torch": torch.__version__,
           "machine": platform.machine(), "images_per_s": results, "precision_auto_picks": auto}
    path = Path(__file__).parent / "results" / "stage1_speed.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"{'setting':<20} {'images/s':>9}")
    for name, ips in results.items():
        print(f"{name:<20} {ips:>9.0f}")
    print(f"(ResNet-32, batch {args.batch}, {args.threads} threads; saved {path})")
    print(f"train.precision auto picks {auto} on this CPU; the fastest measured: {max(results, key=results.get)}")


if __name__ == "__main__":
    main()
