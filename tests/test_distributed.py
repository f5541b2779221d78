"""Distributed data parallel: the collectives' tensors, sharded evaluation, and a two-process
torchrun run on the CPU (gloo)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tailaug import commands
from tailaug.config import load_config
from tailaug.engine import distributed
from tailaug.engine.distributed import COLLECTIVE_DTYPES, DistInfo, shard
from tailaug.engine.inference import collect_outputs
from tailaug.stages.representation import Trainer

from synthetic import class_images, write_fashion_mnist, write_idx


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 7, 12])
def test_shard_blocks_are_equal_and_gather_to_the_split_in_order(n, world):
    blocks = [shard(n, r, world) for r in range(world)]
    assert {len(b) for b in blocks} == {-(-n // world)}  # equal sizes for all_gather
    gathered = np.concatenate(blocks)
    assert gathered[:n].tolist() == list(range(n))  # the first n rows are the split in order
    assert gathered.min() >= 0 and gathered.max() < n  # padding repeats valid items


class FakeGroup:
    """An initialised process group of ``world`` ranks inside this process, seen from rank 0.

    Every collective fails unless its tensors are on ``device`` (the process's device: NCCL
    reduces CUDA tensors only) and of a dtype NCCL supports. The other ranks are simulated
    as copies of rank 0 (all_reduce multiplies by ``world``, all_gather repeats the tensor).
    """

    def __init__(self, device: torch.device, world: int):
        self.device, self.world, self.calls = device, world, []

    def check(self, name, tensor):
        assert tensor.device == self.device, f"{name} on {tensor.device}; the process's device is {self.device}"
        assert tensor.dtype in COLLECTIVE_DTYPES, f"{name} of dtype {tensor.dtype}"
        self.calls.append(name)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self.check("all_reduce", tensor)
        tensor.mul_(self.world)

    def all_gather(self, parts, tensor, group=None, async_op=False):
        self.check("all_gather", tensor)
        assert len(parts) == self.world
        for part in parts:
            self.check("all_gather output", part)
            part.copy_(tensor)

    def broadcast(self, tensor, src=0, group=None, async_op=False):
        self.check("broadcast", tensor)

    def install(self, monkeypatch):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: self.world)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: self.calls.append("barrier"))
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(dist, "all_gather", self.all_gather)
        monkeypatch.setattr(dist, "broadcast", self.broadcast)


def test_collectives_get_tensors_on_the_process_device(tmp_path, monkeypatch, one_thread):
    """Training and evaluation as rank 0 of 3. The default device is set to ``meta`` meanwhile,
    so a tensor created without naming the process's device (e.g. epoch totals summed on the
    CPU while the model runs on a GPU) lands on ``meta`` and fails the check or the run."""
    root = write_fashion_mnist(tmp_path / "fm", per_class_train=30, per_class_test=5)
    cfg = load_config("configs/fmnist_lt/demo.yaml", [
        f"data.root={root}", "data.n_max=30", "data.imbalance_factor=5", "model.arch=resnet20",
        "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=8", "train.precision=fp32",
        f"run.output_dir={tmp_path}",
    ])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    test = trainer.data.test
    single = collect_outputs(trainer.model, trainer.batches(test), trainer.device)
    group = FakeGroup(trainer.device, world=3)
    group.install(monkeypatch)
    trainer.dist = DistInfo(rank=0, world_size=3)
    torch.set_default_device("meta")
    try:
        shared = trainer.outputs(test)
        record = trainer.train_epoch(0)
        distributed.barrier()
    finally:
        torch.set_default_device(None)
    assert group.calls.count("all_reduce") == 1 and group.calls.count("all_gather") == 4
    assert group.calls.count("broadcast") == len(list(trainer.model.buffers()))
    # rank 0 evaluated the first ceil(50 / 3) = 17 test images; the fake ranks 1, 2 repeat them
    assert len(test) == 50
    assert shared["index"].tolist() == (list(range(17)) * 3)[:50]
    torch.testing.assert_close(shared["logits"][:17], single["logits"][:17])
    assert shared["labels"][:17].tolist() == test.labels[:17].tolist()
    assert record["train_loss"] > 0 and 0 <= record["train_acc"] <= 100


def write_odd_test_set(root, size=101, seed=1):
    """Replace the test split with ``size`` images, a size no world size > 1 here divides."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(10), rng.integers(0, 10, size - 10)]).astype(np.uint8)
    write_idx(root / "t10k-images-idx3-ubyte.gz", class_images(labels, rng)[:, 0])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)


def free_port() -> int:
    """A TCP port nothing listens on now, so that two test runs on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_train_and_evaluate(tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", per_class_train=60, per_class_test=10)
    write_odd_test_set(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "tailaug.cli", "train", "configs/fmnist_lt/demo.yaml", f"data.root={data}",
        "data.n_max=60", "data.imbalance_factor=10", "data.num_workers=0", "model.arch=resnet20",
        "train.epochs=6", "train.batch_size=32", "train.eval_batch_size=16", "train.lr=0.05",
        "train.mixup_alpha=0", "train.precision=fp32", "train.sampler.kind=class_balanced",
        f"run.output_dir={tmp_path / 'runs'}", "run.name=ddp", "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    results = json.loads((run / "results.json").read_text())["rows"]["stage 1"]["metrics"]
    assert results["top1"] > 40  # chance: 10%
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(6))  # one writer: rank 0
    assert proc.stdout.count("stage 1 (last epoch)") == 1
    # the test set was evaluated in two shards (51 + 50 padded by 1); one process gets the same
    alone = commands.evaluate(run)
    assert results["num_samples"] == alone["num_samples"] == 101
    assert alone["confusion"] == results["confusion"] and alone["top1"] == results["top1"]
    assert alone["ece"] == pytest.approx(results["ece"], abs=1e-4)
