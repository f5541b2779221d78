"""Mid-epoch checkpoints of stage 1 (train.checkpoint_every_steps): the packed random streams,
the batches a resumed epoch skips, a run stopped in the middle of an epoch and resumed against
an uninterrupted one (same weights, same logged metrics) for plain CE, mixup with Remix, a
feature augmenter drawing per step (FASA) and one with running epoch sums (MetaSAug), in one
process and in two (torchrun), which checkpoint a resumed run picks, and config and checkpoint
errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tailaug.config import load_config
from tailaug.data.datasets import Split
from tailaug.data.loaders import Batches
from tailaug.data.transforms import BatchTransform
from tailaug.engine.seed import set_stream_state, stream_state, torch_generator
from tailaug.errors import CheckpointError, ConfigError
from tailaug.stages.pipeline import stage1_state
from tailaug.stages.representation import Trainer
from tailaug.stages.stage1_model import checkpoint_path, mid_epoch_path, resume_checkpoint

from synthetic import TINY_STAGE1, train_tiny, write_fashion_mnist

# 2 epochs of 9 steps (159 training images: n_max 40 at imbalance 10; batches of 16)
TINY = [*TINY_STAGE1, "data.n_max=40", "train.epochs=2", "train.batch_size=16", "train.warmup_epochs=0"]
EVERY = 3  # a checkpoint after steps 3 and 6 of every epoch (not 9: the epoch's end)
TIMING = ("images_per_s", "epoch_s")  # the only entries of a record that may differ


def test_stream_state_restores_every_draw_to_come():
    gen, rng = torch_generator(1, 2, 3), np.random.default_rng([1, 2, 3])
    torch.rand(5, generator=gen)
    rng.random(3)
    rng.integers(0, 10, size=3, dtype=np.uint32)  # leaves half a 64-bit word buffered (has_uint32)
    assert rng.bit_generator.state["has_uint32"] == 1
    packed = stream_state([gen], rng)
    assert packed.dtype == torch.int64 and packed.shape == (5056 // 8 + 6,)

    def draws(g, r):
        return torch.rand(7, generator=g), r.integers(0, 2**31, size=3, dtype=np.uint32), r.beta(1, 1), r.permutation(9)

    expected = draws(gen, rng)
    other_gen, other_rng = torch_generator(9), np.random.default_rng(5)
    set_stream_state(packed, [other_gen], other_rng)
    got = draws(other_gen, other_rng)
    assert torch.equal(got[0], expected[0]) and all(np.array_equal(a, b) for a, b in zip(got[1:], expected[1:]))
    with pytest.raises(ValueError, match="need 6"):
        set_stream_state(packed, [], other_rng)  # other generators than were saved


class Recorded(torch.utils.data.Dataset):
    """An image folder stand-in that records which images were read."""

    def __init__(self, images, labels):
        self.images, self.labels, self.read = images, labels, []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self.read.append(i)
        return self.images[i], int(self.labels[i])


def test_batches_from_a_start_step_are_the_rest_of_the_epoch_and_read_nothing_before():
    labels = np.arange(50) % 5
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 4, 4).contiguous()
    order = np.random.default_rng(0).permutation(50)
    folder = Recorded(images, labels)
    for split in (Split(labels, images=images), Split(labels, dataset=folder)):
        batches = Batches(split, 8, BatchTransform((0.0,), (1.0,), padding=0), torch.device("cpu"), order=order,
                          drop_last=True)
        whole = [(x[:, 0, 0, 0].tolist(), idx.tolist()) for x, _, idx in batches.raw()]
        assert len(whole) == len(batches) == 6 and whole[0] == (order[:8].tolist(),) * 2
        folder.read.clear()
        assert [(x[:, 0, 0, 0].tolist(), idx.tolist()) for x, _, idx in batches.raw(4)] == whole[4:]
        assert list(batches.raw(6)) == []
    assert folder.read == order[32:48].tolist()  # batches 4 and 5 only


def test_checkpoint_every_steps_is_a_count_of_steps():
    assert load_config(None, []).train.checkpoint_every_steps == 0
    assert load_config(None, ["train.checkpoint_every_steps=500"]).train.checkpoint_every_steps == 500
    for bad in ("-1", "2.5", "often"):
        with pytest.raises(ConfigError, match=r"train\.checkpoint_every_steps") as err:
            load_config(None, [f"train.checkpoint_every_steps={bad}"])
        assert str(err.value).count("\n") == 1  # the header and one line naming the key


# ---------------------------------------------------------------------------- stopped and resumed

# overrides of each case, and the checkpoint_every_steps of its uninterrupted run: 0, or at least
# the 9 steps of an epoch (no checkpoint falls within an epoch: the same as 0)
CASES = {
    "ce": ([], 0),
    "mixup_remix": (["train.mixup_alpha=1.0", "train.remix={kappa: 3.0, tau: 0.5}"], 9),
    "fasa": (["data.val_per_class=5", "train.feature_augmenter={name: fasa, ratio: 0.5}"], 1000),
    "metasaug": (["data.val_per_class=5",
                  "train.feature_augmenter={name: metasaug, lambda0: 0.5, meta_batch: 10, meta_params: head}"], 0),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), per_class_train=45, per_class_test=5)


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def weights(run_dir):
    return torch.load(checkpoint_path(run_dir), weights_only=True)["model"]


def same_weights(run_dir, other) -> bool:
    a, b = weights(run_dir), weights(other)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stop_after(monkeypatch, epoch: int, step: int) -> None:
    """The next training run dies (KeyboardInterrupt) right after optimiser step ``step`` (0-based)
    of ``epoch``: the steps after the last mid-epoch checkpoint are lost and done again."""
    real = Trainer.step

    def step_then_stop(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if kwargs["at"] == (epoch, step):
            monkeypatch.setattr(Trainer, "step", real)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Trainer, "step", step_then_stop)


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_stopped_within_an_epoch_resumes_as_if_uninterrupted(case, root, tmp_path, monkeypatch, one_thread):
    overrides, whole_every = CASES[case]
    overrides = [*TINY, *overrides]
    saves = []
    real_save = Trainer.save_mid_epoch
    monkeypatch.setattr(Trainer, "save_mid_epoch",
                        lambda self, e, s, *a: saves.append((e, s)) or real_save(self, e, s, *a))
    first = train_tiny([*overrides, f"train.checkpoint_every_steps={whole_every}"], root, tmp_path, "whole")
    assert saves == [] and not mid_epoch_path(tmp_path / "whole").exists()

    # stopped after step 8 of epoch 1 (ce: no last.pt yet) or 2; the checkpoint after step 6 is the newest
    epoch = 0 if case == "ce" else 1
    stop_after(monkeypatch, epoch, 7)
    args = [*overrides, f"train.checkpoint_every_steps={EVERY}"]
    with pytest.raises(KeyboardInterrupt):
        train_tiny(args, root, tmp_path, "stopped")
    run = tmp_path / "stopped"
    assert saves == [(e, s) for e in range(epoch + 1) for s in (3, 6)]
    ckpt = torch.load(mid_epoch_path(run), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["world_size"]) == (epoch, 6, 1)
    assert ckpt["totals"].shape == (1, 3 + 2 * 10) and ckpt["totals"][0, 2] == 6 * 16  # images seen so far
    assert checkpoint_path(run).exists() == (epoch == 1) and (run / "config.yaml").is_file()
    cfg = load_config(run / "config.yaml")
    assert resume_checkpoint(run, cfg)[0] == mid_epoch_path(run) and stage1_state(cfg, run) == "resume"
    if case == "mixup_remix":  # a mid-epoch checkpoint of two processes cannot go on in one
        torch.save({**ckpt, "world_size": 2}, mid_epoch_path(run))
        with pytest.raises(CheckpointError, match=r"written in epoch 2 by 2 process\(es\), and this run has 1: "
                                                  r"resume with 2, or delete .*mid_epoch\.pt"):
            train_tiny(args, root, tmp_path, "stopped", resume=True)
        torch.save(ckpt, mid_epoch_path(run))
    stale = shutil.copy(mid_epoch_path(run), tmp_path / "stale.pt")

    del saves[:]
    resumed = train_tiny(args, root, tmp_path, "stopped", resume=True)
    assert saves == [(1, 3), (1, 6)] * (epoch == 0)  # none left in the resumed epoch
    assert not mid_epoch_path(run).exists()  # removed once its epoch's last.pt is written
    assert records(run) == records(tmp_path / "whole")
    assert resumed["per_class"] == first["per_class"]
    assert same_weights(run, tmp_path / "whole")
    if case == "metasaug":  # its running meta loss is in the checkpointed augmenter state
        assert "meta_steps" in ckpt["feature_augmenter"] and "metasaug_meta_loss" in records(run)[epoch]
    # a mid-epoch checkpoint left beside a later last.pt (stopped between writing one and deleting the other)
    shutil.copy(stale, mid_epoch_path(run))
    assert resume_checkpoint(run, cfg)[0] == checkpoint_path(run)


# under torchrun: an uninterrupted run, then one whose ranks all stop after step 8 of epoch 2
# (10 steps of 8 images per rank) and resume (one launch: it costs more than the training)
DRIVER = """
import os
import sys

import torch
from tailaug.cli import main
from tailaug.stages.representation import Trainer

args = ["train", *sys.argv[1:]]
assert main([*args, "run.name=whole", "train.checkpoint_every_steps=0"]) == 0
real = Trainer.step

def step_then_stop(self, *a, **kw):
    out = real(self, *a, **kw)
    if kw["at"] == (1, 7):
        Trainer.step = real
        raise KeyboardInterrupt
    return out

Trainer.step = step_then_stop
stopped = [*args, "run.name=ddp", "train.checkpoint_every_steps=3"]
assert main(stopped) == 130
if os.environ["RANK"] == "0":
    out = next(a.split("=", 1)[1] for a in args if a.startswith("run.output_dir="))
    ckpt = torch.load(os.path.join(out, "ddp", "checkpoints", "mid_epoch.pt"), weights_only=True)
    print("mid-epoch checkpoint", ckpt["epoch"], ckpt["step"], ckpt["world_size"], tuple(ckpt["streams"].shape),
          ckpt["totals"][:, 2].tolist())
sys.exit(main([*stopped, "--resume"]))
"""


@pytest.mark.slow
def test_torchrun_two_processes_resume_within_an_epoch_as_if_uninterrupted(root, tmp_path):
    """Rank 0 writes every process's streams and sums; each resumes its own from the same step."""
    from synthetic import torchrun_train

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = torchrun_train(["configs/fmnist_lt/demo.yaml", *TINY, "train.mixup_alpha=1.0", f"data.root={root}",
                           f"run.output_dir={tmp_path}"], script=driver)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("tailaug: interrupted") == 2  # both ranks stopped, then finished
    # epoch 2 after step 6: both ranks' streams (a CPU generator of each kind: 2 x 632 words + numpy's 6)
    # and sums (48 images each)
    assert "mid-epoch checkpoint 1 6 2 (2, 1270) [48.0, 48.0]" in proc.stdout
    assert records(tmp_path / "ddp") == records(tmp_path / "whole")
    assert same_weights(tmp_path / "ddp", tmp_path / "whole")
