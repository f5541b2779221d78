"""Engine (schedule, checkpoints, precision, metrics log) and the batch pipeline (transforms, loaders)."""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import tailaug.engine.device as device_module

from tailaug.config import TrainConfig
from tailaug.data.datasets import Split
from tailaug.data.loaders import Batches
from tailaug.data.transforms import MEAN_STD, BatchTransform, random_crop, random_flip
from tailaug.engine.checkpoint import (atomic_write, atomic_write_text, exception_summary, load_checkpoint,
                                      load_state, load_tensors, save_checkpoint)
from tailaug.engine.device import cpu_flags, resolve_precision
from tailaug.engine.logging import MetricsLogger
from tailaug.engine.schedule import lr_at
from tailaug.engine.seed import torch_generator
from tailaug.errors import CheckpointError, ConfigError

CPU = torch.device("cpu")

# --------------------------------------------------------------------------- lr schedule


def test_warmup_is_linear_per_step():
    cfg = TrainConfig(lr=0.1, warmup_epochs=5)
    spe = 10
    # step k of the warm-up (0-based, over all warm-up epochs) gives lr * (k + 1) / (5 * 10)
    assert lr_at(cfg, 0, 0, spe) == pytest.approx(0.1 * 1 / 50)
    assert lr_at(cfg, 0, 9, spe) == pytest.approx(0.1 * 10 / 50)
    assert lr_at(cfg, 2, 3, spe) == pytest.approx(0.1 * 24 / 50)
    assert lr_at(cfg, 4, 9, spe) == pytest.approx(0.1)
    values = [lr_at(cfg, e, s, spe) for e in range(5) for s in range(spe)]
    diffs = np.diff(values)
    np.testing.assert_allclose(diffs, 0.1 / 50, rtol=1e-9)
    # after warm-up: the schedule's value
    assert lr_at(cfg, 5, 0, spe) == pytest.approx(0.1)


def test_no_warmup_starts_at_lr():
    cfg = TrainConfig(lr=0.2, warmup_epochs=0)
    assert lr_at(cfg, 0, 0, 100) == pytest.approx(0.2)


def test_multistep():
    cfg = TrainConfig(lr=0.1, warmup_epochs=5, schedule="multistep", milestones=[160, 180], gamma=0.1)
    assert lr_at(cfg, 5) == pytest.approx(0.1)
    assert lr_at(cfg, 159, 99, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 160) == pytest.approx(0.01)
    assert lr_at(cfg, 179, 5, 10) == pytest.approx(0.01)
    assert lr_at(cfg, 180) == pytest.approx(0.001)
    assert lr_at(cfg, 199) == pytest.approx(0.001)


def test_step_schedule():
    cfg = TrainConfig(lr=0.1, warmup_epochs=0, schedule="step", step_size=10, gamma=0.5)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 3, 4) == pytest.approx(0.1)
    assert lr_at(cfg, 10) == pytest.approx(0.05)
    assert lr_at(cfg, 25) == pytest.approx(0.025)
    # the epoch count includes the warm-up epochs
    cfg = TrainConfig(lr=0.1, warmup_epochs=3, schedule="step", step_size=10, gamma=0.5)
    assert lr_at(cfg, 3) == pytest.approx(0.1)
    assert lr_at(cfg, 10) == pytest.approx(0.05)


def test_cosine_schedule():
    cfg = TrainConfig(lr=0.1, epochs=25, warmup_epochs=5, schedule="cosine", min_lr=0.001)
    spe = 4
    assert lr_at(cfg, 5, 0, spe) == pytest.approx(0.1)  # cosine starts at lr
    # halfway through the 20 cosine epochs: (lr + min_lr) / 2
    assert lr_at(cfg, 15, 0, spe) == pytest.approx((0.1 + 0.001) / 2)
    # per step: progress 7.5 -> t = 2.5 / 20
    t = 2.5 / 20
    assert lr_at(cfg, 7, 2, spe) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * t)))
    # the end value is min_lr
    assert lr_at(cfg, 25, 0, spe) == pytest.approx(0.001)
    # and the last step of training is just above it
    last = lr_at(cfg, 24, spe - 1, spe)
    assert 0.001 < last < 0.0011
    values = [lr_at(cfg, e, s, spe) for e in range(5, 25) for s in range(spe)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_cosine_without_min_lr_ends_at_zero():
    cfg = TrainConfig(lr=0.5, epochs=10, warmup_epochs=0, schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.5)
    assert lr_at(cfg, 10) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- checkpoints


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_save_and_load_round_trip(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(6.0).view(2, 3)}, "best": 0.5, "rng": [1, 2]}
    path = save_checkpoint(tmp_path / "sub" / "last.pt", state)
    assert path == tmp_path / "sub" / "last.pt"
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["best"] == 0.5 and loaded["rng"] == [1, 2]
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert _listing(tmp_path / "sub") == ["last.pt"]  # no temp file left behind


def test_save_checkpoint_failing_write_keeps_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    old_bytes = path.read_bytes()
    # a lambda cannot be pickled: torch.save fails half-way through writing the temp file
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_checkpoint(path, {"epoch": 2, "bad": lambda: None})
    assert path.read_bytes() == old_bytes
    assert load_checkpoint(path) == {"epoch": 1}
    assert _listing(tmp_path) == ["last.pt"]


def test_atomic_write_interrupted_after_partial_write(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, write)
    assert load_checkpoint(path) == {"epoch": 1}
    assert _listing(tmp_path) == ["last.pt"]


def test_atomic_write_keyboard_interrupt_cleans_up(tmp_path):
    def write(tmp):
        open(tmp, "wb").write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f.bin", write)
    assert _listing(tmp_path) == []


def test_load_missing_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert f"checkpoint {path} does not exist" in msg
    assert "--resume" not in msg  # the loader serves evaluate and run too, where it does not apply


def test_load_truncated_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 4, "w": torch.randn(100)})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert f"checkpoint {path} cannot be read" in msg
    assert "truncated or not a tailaug checkpoint: replace it with an intact copy" in msg
    # no advice to fall back on "the previous epoch's file": tailaug keeps none
    assert "previous epoch" not in msg


def test_load_empty_checkpoint(tmp_path):
    # torch.load raises an exception with an empty message here; the error must still be one clean line
    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, fix="do this")
    assert str(info.value) == (f"checkpoint {path} cannot be read (EOFError); it is truncated or not a tailaug "
                               "checkpoint: do this")


def test_exception_summary():
    assert exception_summary(EOFError()) == "EOFError"
    assert exception_summary(ValueError("bad\nmore detail")) == "ValueError: bad"
    # a first line that only introduces the second keeps both
    assert exception_summary(RuntimeError("Errors in X:\n\tsize mismatch for w\n\tother")) == \
        "RuntimeError: Errors in X: size mismatch for w"
    long = exception_summary(KeyError("k" * 500), limit=40)
    assert len(long) == 40 and long.endswith("...")


def test_load_state_that_does_not_fit(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError) as info:
        load_state(model, {"weight": torch.zeros(5, 5), "bias": torch.zeros(2)}, tmp_path / "c.pt", "do this")
    msg = str(info.value)
    assert msg.startswith(f"the Linear state in {tmp_path / 'c.pt'} does not fit (RuntimeError: ")
    assert "size mismatch for weight" in msg and msg.endswith("; do this") and "\n" not in msg
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in ({"x": 1}, [1, 2]):
        with pytest.raises(CheckpointError, match="the SGD state in .* does not fit"):
            load_state(optimizer, bad, tmp_path / "c.pt")


@pytest.mark.parametrize("content", [[1, 2], "text", 3])
def test_load_tensors_refuses_a_torch_file_without_a_dict(tmp_path, content):
    path = tmp_path / "w.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as info:
        load_tensors(path)
    assert str(info.value) == (f"{path} holds a {type(content).__name__}, not a dict of tensors; "
                               "replace it with an intact copy")


def test_atomic_write_makes_every_file_0644(tmp_path):
    from safetensors.torch import save_file

    writers = {
        "a.txt": lambda p: atomic_write_text(p, "x"),
        "b.pt": lambda p: save_checkpoint(p, {"epoch": 1}),
        # save_file replaces the temporary file with one of its own, mode 0600
        "c.safetensors": lambda p: atomic_write(p, lambda tmp: save_file({"w": torch.zeros(2)}, tmp)),
    }
    old = os.umask(0o077)  # the mode is the promised one whatever the umask
    try:
        for name, write in writers.items():
            write(tmp_path / name)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == dict.fromkeys(writers, 0o644)


class Payload:
    """A custom class: unpickling it needs code, so weights_only refuses it."""

    def __init__(self):
        self.value = 42


def test_load_refuses_arbitrary_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "obj": Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "cannot be read" in msg and "not a tailaug checkpoint" in msg
    assert "\n" not in msg  # one line of the underlying error, not the whole torch explanation


def test_load_refuses_reduce_payload(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- transforms


def _arange_images(n: int, c: int = 2, h: int = 5, w: int = 6) -> torch.Tensor:
    """Every pixel distinct and non-zero, so a crop shows exactly where it came from."""
    return (torch.arange(n * c * h * w, dtype=torch.int64) + 1).view(n, c, h, w)


def test_random_crop_is_a_window_of_the_padded_image():
    p = 2
    x = _arange_images(200)
    out = random_crop(x, p, torch_generator(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    assert padded[0, 0, 0, 0] == 0 and padded[0, 0, p, p] == x[0, 0, 0, 0]
    offsets = set()
    for i in range(len(x)):
        matches = [
            (oy, ox) for oy in range(2 * p + 1) for ox in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, oy : oy + 5, ox : ox + 6])
        ]
        assert len(matches) == 1, f"image {i} is not a window of its padded image"
        offsets.add(matches[0])
    assert offsets == {(oy, ox) for oy in range(5) for ox in range(5)}  # every shift occurs


def test_random_crop_same_window_for_all_channels():
    x = torch.full((20, 3, 4, 4), 7, dtype=torch.uint8)
    out = random_crop(x, 1, torch_generator(3))
    # the zeros (padding) sit in the same places in every channel
    assert torch.equal(out[:, 0] == 0, out[:, 1] == 0) and torch.equal(out[:, 0] == 0, out[:, 2] == 0)
    assert (out == 0).any()


def test_random_crop_padding_zero_is_identity():
    x = _arange_images(4)
    gen = torch_generator(0)
    state = gen.get_state()
    assert torch.equal(random_crop(x, 0, gen), x)
    assert torch.equal(gen.get_state(), state)  # no draw was made


def test_random_flip_mirrors_about_half():
    x = _arange_images(400, c=1, h=2, w=3)
    out = random_flip(x, torch_generator(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped ^ kept).all())  # each image is exactly itself or its mirror
    assert 160 <= int(flipped.sum()) <= 240
    # the mirror is about the width axis
    i = int(flipped.nonzero()[0])
    assert out[i, 0, 0].tolist() == x[i, 0, 0].tolist()[::-1]
    assert out[i, 0, 1].tolist() == x[i, 0, 1].tolist()[::-1]


def test_batch_transform_normalises_by_hand():
    t = BatchTransform((0.1, 0.2, 0.3), (0.5, 0.25, 0.1))
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[0, :, 0, 0] = 255
    x[0, :, 1, 1] = 51
    out = t(x)  # no generator: no augmentation
    assert out.dtype == torch.float32 and out.shape == (1, 3, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([(1 - 0.1) / 0.5, (1 - 0.2) / 0.25, (1 - 0.3) / 0.1]))
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor([-0.1 / 0.5, -0.2 / 0.25, -0.3 / 0.1]))
    torch.testing.assert_close(out[0, :, 1, 1], torch.tensor([(0.2 - 0.1) / 0.5, 0.0, (0.2 - 0.3) / 0.1]))


def test_batch_transform_dataset_stats():
    mean, std = MEAN_STD["fashion_mnist"]
    out = BatchTransform(mean, std)(torch.full((2, 1, 3, 3), 255, dtype=torch.uint8))
    torch.testing.assert_close(out, torch.full((2, 1, 3, 3), (1 - 0.2860) / 0.3530))


def test_batch_transform_channels_last():
    out = BatchTransform((0.5,) * 3, (0.5,) * 3, channels_last=True)(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_batch_transform_seeded_generator_is_deterministic():
    t = BatchTransform((0.5,), (0.25,), padding=2, flip=True)
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    a = t(x, torch_generator(7, 3))
    b = t(x, torch_generator(7, 3))
    c = t(x, torch_generator(7, 4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, t(x))  # augmented differs from plain
    # the generator's stream is fixed by its keys
    assert torch.equal(torch.rand(5, generator=torch_generator(1, 2)), torch.rand(5, generator=torch_generator(1, 2)))
    assert not torch.equal(torch.rand(5, generator=torch_generator(1, 2)), torch.rand(5, generator=torch_generator(2, 1)))


def test_batch_transform_flip_off():
    t = BatchTransform((0.0,), (1.0,), padding=0, flip=False)
    x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(t(x, torch_generator(0)), x.float() / 255)


# --------------------------------------------------------------------------- Batches


def _split(n: int = 10) -> Split:
    labels = np.arange(n, dtype=np.int64) % 3
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return Split(labels, images)


def _plain() -> BatchTransform:
    return BatchTransform((0.0,), (1.0,), padding=0, flip=False)


def test_batches_in_order_without_sampler():
    split = _split(10)
    batches = Batches(split, 4, _plain(), CPU)
    got = list(batches)
    assert len(batches) == 3 == len(got)
    assert [len(idx) for _, _, idx in got] == [4, 4, 2]
    idx = torch.cat([i for _, _, i in got])
    assert idx.tolist() == list(range(10))
    for x, y, i in got:
        assert x.shape == (len(i), 1, 2, 2) and x.dtype == torch.float32
        assert y.tolist() == split.labels[i.numpy()].tolist()
        # each image is the one at its index (pixel value = index)
        torch.testing.assert_close(x[:, 0, 0, 0], i.float() / 255)


def test_batches_drop_last():
    batches = Batches(_split(10), 4, _plain(), CPU, drop_last=True)
    got = [i.tolist() for _, _, i in batches]
    assert len(batches) == 2
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7]]
    exact = Batches(_split(8), 4, _plain(), CPU, drop_last=True)
    assert len(exact) == 2 == len(list(exact))


def test_batches_len_rounds_up():
    assert len(Batches(_split(9), 3, _plain(), CPU)) == 3
    assert len(Batches(_split(10), 3, _plain(), CPU)) == 4
    assert len(Batches(_split(10), 3, _plain(), CPU, drop_last=True)) == 3
    assert len(Batches(_split(2), 5, _plain(), CPU, drop_last=True)) == 0


def test_batches_follow_given_order():
    order = [9, 0, 5, 5, 2]
    batches = Batches(_split(10), 2, _plain(), CPU, order=order)
    assert len(batches) == 3
    assert [i.tolist() for _, _, i in batches] == [[9, 0], [5, 5], [2]]


def test_batches_augment_is_seeded_by_epoch():
    split = Split(np.zeros(6, dtype=np.int64), torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8))
    t = BatchTransform((0.5,), (0.5,), padding=2, flip=True)
    a = Batches(split, 3, t, CPU, augment=True, seed=1)
    b = Batches(split, 3, t, CPU, augment=True, seed=1)
    first = [x for x, _, _ in a]
    assert all(torch.equal(p, q) for p, q in zip(first, [x for x, _, _ in b]))
    a.set_epoch(1)
    assert not all(torch.equal(p, q) for p, q in zip(first, [x for x, _, _ in a]))
    assert Batches(split, 3, t, CPU).generator() is None


# --------------------------------------------------------------------------- precision


AMX = {"fpu", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
AVX512_BF16 = {"fpu", "avx512f", "avx512_bf16"}  # the CPU where bf16 autocast measured slower than fp32


def test_precision_auto_on_the_cpu_is_bf16_only_with_amx(capsys, monkeypatch):
    monkeypatch.setattr(device_module, "_announced", set())  # earlier tests may have printed the notice
    assert resolve_precision("auto", CPU, flags=AMX) is torch.bfloat16
    assert resolve_precision("auto", CPU, flags=AVX512_BF16) is None
    assert resolve_precision("auto", CPU, flags=set()) is None
    for _ in range(3):
        resolve_precision("auto", CPU, flags=AMX)
    out = capsys.readouterr().out.splitlines()
    assert out.count("train.precision auto: bf16 on a CPU with AMX") == 1  # printed once
    assert out.count("train.precision auto: fp32 on a CPU without AMX, where bf16 is slower") == 1


def test_cpu_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # ARM
    assert cpu_flags(info) == {"fp", "asimd", "bf16"}


def test_resolve_precision_cpu():
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    with pytest.raises(ConfigError, match="train.precision fp16 needs CUDA; on the CPU use bf16 or fp32"):
        resolve_precision("fp16", CPU)


# --------------------------------------------------------------------------- metrics log


def _write_metrics(run_dir, epochs):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"epoch": e, "loss": 1.0 / (e + 1)}) for e in epochs]
    lines.append(json.dumps({"note": "no epoch"}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_logger_resume_drops_rerun_epochs(tmp_path):
    _write_metrics(tmp_path, range(5))
    logger = MetricsLogger(tmp_path, resume_epoch=3)
    try:
        records = _read(logger.path)
        assert [r.get("epoch") for r in records] == [0, 1, 2, None]
        logger.log({"epoch": 3, "loss": 0.1}, step=30)
    finally:
        logger.close()
    assert [r.get("epoch") for r in _read(logger.path)] == [0, 1, 2, None, 3]
    assert (tmp_path / "tensorboard").is_dir()


def test_metrics_logger_resume_drops_a_partial_last_line(tmp_path):
    # kill -9 during an append leaves a last line cut short
    _write_metrics(tmp_path, range(3))
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"epoch": 3, "lo')
    logger = MetricsLogger(tmp_path, resume_epoch=3)
    try:
        logger.log({"epoch": 3, "loss": 0.1}, step=3)
    finally:
        logger.close()
    assert [r.get("epoch") for r in _read(path)] == [0, 1, 2, None, 3]


@pytest.mark.parametrize("bad", ['{"epoch": 1, "lo', "[1, 2]", "7"])
def test_metrics_logger_corrupt_line_inside_the_file(tmp_path, bad):
    _write_metrics(tmp_path, range(3))
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n")
    before = path.read_text()
    with pytest.raises(CheckpointError) as info:
        MetricsLogger(tmp_path, resume_epoch=2)
    assert str(info.value).startswith(f"{path} line 2 is not a JSON record; delete that line")
    assert path.read_text() == before


def test_metrics_logger_fresh_run_starts_empty(tmp_path):
    _write_metrics(tmp_path, range(3))
    logger = MetricsLogger(tmp_path)
    try:
        assert not logger.path.exists()
        logger.log({"epoch": 0, "acc": 0.5}, step=0)
        logger.log({"epoch": 1, "acc": 0.6}, step=1)
    finally:
        logger.close()
    assert _read(logger.path) == [{"epoch": 0, "acc": 0.5}, {"epoch": 1, "acc": 0.6}]


def test_metrics_logger_disabled_writes_nothing(tmp_path):
    _write_metrics(tmp_path, range(3))
    before = (tmp_path / "metrics.jsonl").read_text()
    logger = MetricsLogger(tmp_path, enabled=False, resume_epoch=1)
    logger.log({"epoch": 5}, step=5)
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not (tmp_path / "tensorboard").exists()
