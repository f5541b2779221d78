"""Tiny on-disk datasets for tests, written in the real file formats; a two-process torchrun;
a stage 1 stopped and resumed; a feature cache of three Gaussian classes."""

from __future__ import annotations

import gzip
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (gzipped when the name ends in .gz) holding a uint8 array."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)


def class_images(labels: np.ndarray, rng: np.random.Generator, size: int = 28, channels: int = 1) -> np.ndarray:
    """Noisy images whose class shows as a bright 6x6 patch at a class-specific place."""
    images = rng.integers(0, 60, (len(labels), channels, size, size)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 4)
        images[i, :, 3 + 7 * r : 9 + 7 * r, 3 + 6 * q : 9 + 6 * q] = 230
    return images


def write_fashion_mnist(root: Path, per_class_train: int = 40, per_class_test: int = 20, seed: int = 0) -> Path:
    """A 10-class Fashion-MNIST look-alike in IDX format (balanced; the profile makes it long-tailed)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", class_images(labels, rng)[:, 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def long_tail_embeddings(counts, dim: int = 8, seed: int = 0, spread: float = 3.0, test_per_class: int = 0):
    """Gaussian clusters, one per class, with ``counts`` training rows per class (and
    ``test_per_class`` test rows): (x, y) or (x, y, x_test, y_test), float32 and int64."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, spread, (len(counts), dim))

    def draw(per_class):
        y = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(per_class)])
        return (means[y] + rng.normal(0, 1, (len(y), dim))).astype(np.float32), y

    x, y = draw(counts)
    return (x, y) if not test_per_class else (x, y, *draw([test_per_class] * len(counts)))


def write_class_folders(root: Path, counts: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """``root/<class name>/<i>.png``: RGB images of ``class_images`` (class k: the k-th name)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(class_images(np.full(n, k), rng, size=size, channels=3)):
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
    return root


def torchrun_train(args: list[str], timeout: int = 300, script: Path | None = None) -> subprocess.CompletedProcess:
    """``tailaug train ARGS`` (or the Python file ``script`` with ARGS) under torchrun with two CPU
    processes (one thread each) on a free port, from the repository root; the completed process
    (stdout and stderr captured)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = [str(script)] if script is not None else ["-m", "tailaug.cli", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           *entry, *args, "--no-progress"]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


def stop_and_resume(monkeypatch, train, at_epoch: int, **resume_options):
    """``train()`` stopped by a KeyboardInterrupt as epoch ``at_epoch`` (0-based) starts, then
    ``train(resume=True, **resume_options)``; returns what the resumed call returns."""
    import pytest

    from tailaug.stages.representation import Trainer

    real_epoch = Trainer.train_epoch

    def stop(self, epoch):
        if epoch == at_epoch:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    return train(resume=True, **resume_options)


def gaussian_feature_cache(val_per_class: int = 0) -> dict:
    """A stage-3 feature cache of three 4-d Gaussian classes around 3 * e_c (train 40/10/4,
    test 20 each, validation ``val_per_class`` each when > 0), the stage-1 head the class means."""
    import torch

    g = torch.Generator().manual_seed(0)
    means = torch.eye(3, 4) * 3

    def split(counts):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        return means[labels] + torch.randn(len(labels), 4, generator=g), labels

    train_x, train_y = split([40, 10, 4])
    cache = {"train_features": train_x, "train_labels": train_y, "train_index": torch.arange(54),
             "class_counts": torch.tensor([40, 10, 4]), "head_weight": means, "head_bias": torch.zeros(3)}
    cache["test_features"], cache["test_labels"] = split([20, 20, 20])
    if val_per_class:
        cache["val_features"], cache["val_labels"] = split([val_per_class] * 3)
    return cache


# a ResNet-20 stage 1 of 6 short epochs on write_fashion_mnist's data (the stage-1 augmenter tests)
TINY_STAGE1 = ["data.n_max=100", "data.imbalance_factor=10", "data.num_workers=0", "model.arch=resnet20",
               "train.epochs=6", "train.batch_size=32", "train.warmup_epochs=1", "train.lr=0.05",
               "train.mixup_alpha=0", "train.schedule=cosine", "train.precision=fp32"]


def train_tiny(overrides: list[str], root, out, name: str, resume: bool = False) -> dict:
    """``tailaug train`` of the demo config with ``overrides`` into ``out/name`` (its stage-1 row)."""
    from tailaug import commands

    args = [*overrides, f"data.root={root}", f"run.output_dir={out}", f"run.name={name}"]
    return commands.train("configs/fmnist_lt/demo.yaml", args, resume=resume, progress=False)


def fit_without_forward_pass(tmp_path: Path, monkeypatch, overrides: list[str], name: str):
    """A stage-1 Trainer of the demo config with ``overrides`` on synthetic Fashion-MNIST whose
    feature augmenter (``name``) has been fitted while any forward pass over a split fails."""
    from tailaug.config import load_config
    from tailaug.stages.representation import Trainer

    root = write_fashion_mnist(tmp_path / "fm", per_class_train=110, per_class_test=2)

    def outputs(self, split):
        raise AssertionError(f"the stage-1 fit of {name} ran a forward pass over a split")

    monkeypatch.setattr(Trainer, "outputs", outputs)
    cfg = load_config("configs/fmnist_lt/demo.yaml", [*overrides, f"data.root={root}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit_feature_augmenter()
    return trainer
