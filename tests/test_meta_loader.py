"""Stage 1's meta batches of image files (MetaSAug on ImageNet-LT, iNaturalist): decoded ahead by
loader workers (loaders.GivenBatches) in step with the training steps, the same images and labels
as ``val.dataset[i]`` of every meta index, nothing decoded in the main process, and a run resumed
within an epoch the same as an uninterrupted one."""

from __future__ import annotations

import os

import pytest
import torch

from tailaug.augment.meta import meta_indices
from tailaug.config import load_config
from tailaug.data.datasets import Split
from tailaug.data.loaders import GivenBatches
from tailaug.data.path_table import PathTable
from tailaug.data.sources import ImageFolderDataset
from tailaug.errors import DataError
from tailaug.stages.representation import Trainer
from tailaug.stages.stage1_model import checkpoint_path, mid_epoch_path

from synthetic import write_class_folders

CONFIG = "configs/images/efficientnet_lite0.yaml"
# 44 training images (30/20/12 less 4 validation and 2 test images per class): 5 steps of 8 per
# epoch; meta steps of 6 validation images from epoch 2 on (epoch 1 has none)
TINY = ["data.image_size=16", "model.arch=resnet20", "model.name=", "model.weights=", "model.mode=finetune",
        "data.val_per_class=4", "data.test_per_class=2", "data.num_workers=1", "train.epochs=3",
        "train.batch_size=8", "train.eval_batch_size=64", "train.warmup_epochs=0", "train.lr=0.05",
        "train.precision=fp32",
        "train.feature_augmenter={name: metasaug, lambda0: 0.5, meta_batch: 6, start_epoch: 1, meta_params: head}"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("folder"), {"a": 30, "b": 20, "c": 12}, size=16)


def trainer(images, out, name, *extra):
    cfg = load_config(CONFIG, [*TINY, *extra, f"data.root={images}", f"run.output_dir={out}"])
    return Trainer(cfg, out / name, progress=False)


@pytest.fixture
def spied(monkeypatch):
    """Records (epoch, step, meta images, meta labels) of every meta step, and counts the images
    decoded in this (the main) process; a forked loader worker counts in its own copy."""
    seen = {"meta": [], "decoded": 0}
    main = os.getpid()
    real_view, real_meta = ImageFolderDataset.view, Trainer.meta_step

    def view(self, index, key=None):
        seen["decoded"] += os.getpid() == main
        return real_view(self, index, key)

    def meta_step(self, rows, epoch, step, **batch):
        meta = real_meta(self, rows, epoch, step, **batch)
        seen["meta"].append((epoch, step, meta.meta_images.clone(), meta.meta_labels.clone()))
        return meta

    monkeypatch.setattr(ImageFolderDataset, "view", view)
    monkeypatch.setattr(Trainer, "meta_step", meta_step)
    return seen


def assert_old_path_images(t: Trainer, meta: list) -> None:
    """Each step's meta batch is what the per-image path decoded: ``val.dataset[i]`` of its indices."""
    val = t.data.val
    for epoch, step, images, labels in meta:
        idx = meta_indices(len(val), 6, t.cfg.run.seed, epoch, step)
        raw = torch.stack([torch.as_tensor(val.dataset[i][0]) for i in idx.tolist()])
        assert torch.equal(images, t.transform(raw)), (epoch, step)
        assert labels.tolist() == val.labels[idx.numpy()].tolist() and labels.dtype == torch.int64


def test_meta_batches_are_the_per_image_views_decoded_by_the_workers(images, tmp_path, spied, one_thread):
    t = trainer(images, tmp_path, "run")
    assert t.data.val.images is None and len(t.train_batches) == 5 and len(t.data.val) == 12
    t.fit()
    assert spied["decoded"] == 0  # the old path decoded 6 images per meta step here
    assert [(e, s) for e, s, *_ in spied["meta"]] == [(e, s) for e in (1, 2) for s in range(5)]
    assert spied["meta"][0][2].shape == (6, 3, 16, 16)
    assert t.meta_feed is None  # an epoch's feed ends with it
    assert_old_path_images(t, spied["meta"])


def test_a_run_resumed_within_an_epoch_meets_the_uninterrupted_one(images, tmp_path, monkeypatch, spied, one_thread):
    trainer(images, tmp_path, "whole").fit()
    real = Trainer.step

    def step_then_stop(self, *args, **kwargs):  # dies after step 4 of epoch 2: the last checkpoint is after step 2
        out = real(self, *args, **kwargs)
        if kwargs["at"] == (1, 3):
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Trainer, "step", step_then_stop)
    with pytest.raises(KeyboardInterrupt):
        trainer(images, tmp_path, "stopped", "train.checkpoint_every_steps=2").fit()
    monkeypatch.setattr(Trainer, "step", real)
    ckpt = torch.load(mid_epoch_path(tmp_path / "stopped"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    del spied["meta"][:]
    t = trainer(images, tmp_path, "stopped", "train.checkpoint_every_steps=2")
    t.fit(resume=True)
    assert [(e, s) for e, s, *_ in spied["meta"]] == [(1, 2), (1, 3), (1, 4)] + [(2, s) for s in range(5)]
    assert spied["decoded"] == 0
    assert_old_path_images(t, spied["meta"])
    a, b = (torch.load(checkpoint_path(tmp_path / run), weights_only=True) for run in ("whole", "stopped"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for name, value in a["feature_augmenter"].items():
        assert torch.equal(b["feature_augmenter"][name], value), name


def test_given_batches_follow_each_pass_and_carry_a_worker_error(images, tmp_path):
    folder = ImageFolderDataset(sorted(images.glob("*/*.png"))[:10], [0, 1] * 5, image_size=16)
    split = Split(folder.labels, dataset=folder)
    given = GivenBatches(split, torch.device("cpu"), num_workers=1, prefetch_factor=2)
    for batches in ([torch.tensor([3, 1, 4]), torch.tensor([1, 5])], [torch.tensor([9, 0])]):  # same workers
        got = list(given.raw(iter(batches)))
        assert len(got) == len(batches)
        for (x, y), idx in zip(got, batches):
            assert torch.equal(x, torch.stack([folder[i][0] for i in idx.tolist()]))
            assert y.tolist() == folder.labels[idx.numpy()].tolist()
    first = given.raw([torch.tensor([0])])
    next(first)  # a pass left unfinished is replaced by the next
    assert [y.tolist() for _, y in given.raw([torch.tensor([2, 3])])] == [[0, 1]]
    paths = list(folder.paths)
    paths[7] = str(tmp_path / "missing.png")
    folder.paths = PathTable(paths)  # a new loader: the workers of the first hold the old paths
    with pytest.raises(DataError, match="missing.png") as err:
        list(GivenBatches(split, torch.device("cpu"), num_workers=1).raw([torch.tensor([6, 7])]))
    assert "\n" not in str(err.value)
