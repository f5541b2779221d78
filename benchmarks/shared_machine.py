"""Stage-1 training speed when other PyTorch processes share the cores.

Times ResNet-32 training steps (batch 128, Fashion-MNIST-shaped, channels_last, float32) in a
fresh process, alone and while ``--competitors`` other processes run the same training loop,
once with OpenMP's default wait policy (idle threads spin) and once with the passive policy
the ``tailaug`` command sets (tailaug.engine.threads.set_passive_wait). Every process uses
the default thread count (the available cores). Writes benchmarks/results/shared_machine.json.

    .venv/bin/python benchmarks/shared_machine.py [--steps 8] [--competitors 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

POLICIES = ("spin", "passive")


def worker(policy: str, steps: int | None) -> None:
    """Train forever (steps None, a competitor) or time ``steps`` steps and print images/s."""
    if policy == "passive":
        from tailaug.engine.threads import set_passive_wait

        set_passive_wait()
    import torch  # after the wait policy: the OpenMP runtime reads it when torch loads

    from tailaug.config import ModelConfig
    from tailaug.data.transforms import BatchTransform
    from tailaug.engine.seed import torch_generator
    from tailaug.engine.threads import apply_threads
    from tailaug.models import build_model

    threads = apply_threads(None)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet32"), 10, 1).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    transform = BatchTransform((0.286,), (0.353,), 4, True, True)
    raw = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (128,))
    gen = torch_generator(0)

    def step():
        loss = torch.nn.functional.cross_entropy(model(transform(raw, gen)).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    if steps is None:
        while True:
            step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"images_per_s": steps * 128 / (time.perf_counter() - t0), "threads": threads}))


def environment(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH")]))
    return env


def measure(policy: str, competitors: int, steps: int, timeout: float) -> float | None:
    cmd = [sys.executable, __file__, "--worker", policy]
    others = [subprocess.Popen(cmd, env=environment(policy), stdout=subprocess.DEVNULL) for _ in range(competitors)]
    try:
        if others:
            time.sleep(5)  # let the competitors reach their training loop
        try:
            out = subprocess.run([*cmd, "--steps", str(steps)], env=environment(policy), capture_output=True,
                                 text=True, timeout=timeout, check=True)
        except subprocess.TimeoutExpired:
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]
    finally:
        for p in others:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--competitors", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per measurement")
    parser.add_argument("--worker", choices=POLICIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps if "--steps" in sys.argv else None)
    load = os.getloadavg()[0]  # other users of the machine, before this benchmark starts
    rows = []
    for competitors in (0, args.competitors):
        for policy in POLICIES:
            ips = measure(policy, competitors, args.steps, args.timeout)
            rows.append({"policy": policy, "competitors": competitors, "images_per_s": ips})
            shown = f"{ips:.0f}" if ips is not None else f"< {args.steps * 128 / args.timeout:.0f} (timed out)"
            print(f"{policy:<8} {competitors} competitors  {shown} images/s", flush=True)
    out = {"steps": args.steps, "batch": 128, "cores": len(os.sched_getaffinity(0)), "rows": rows,
           "load_average_before": load}
    path = Path(__file__).parent / "results" / "shared_machine.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
