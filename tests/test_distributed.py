"""Distributed data parallel on the CPU: torchrun, gloo backend, two processes."""

import json
import os
import subprocess
import sys

from synthetic import write_fashion_mnist


def test_torchrun_two_processes_train_and_evaluate(tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", per_class_train=60, per_class_test=10)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
        "-m", "tailaug.cli", "train", "configs/fmnist_lt/demo.yaml", f"data.root={data}",
        "data.n_max=60", "data.imbalance_factor=10", "data.num_workers=0", "model.arch=resnet20",
        "train.epochs=6", "train.batch_size=32", "train.lr=0.05", "train.mixup_alpha=0", "train.precision=fp32",
        "train.sampler.kind=class_balanced", f"run.output_dir={tmp_path / 'runs'}", "run.name=ddp",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    results = json.loads((run / "results.json").read_text())["rows"]["stage 1"]["metrics"]
    assert results["top1"] > 40  # chance: 10%
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(6))  # one writer: rank 0
    assert proc.stdout.count("stage 1 (last epoch)") == 1
