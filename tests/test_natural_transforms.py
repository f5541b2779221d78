"""The natural-image pipeline (data.transforms natural): views, draws, determinism, GPU decoding, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tailaug.config import load_config, validate_config
from tailaug.data import loaders, natural
from tailaug.data.datasets import Split, image_files_dataset
from tailaug.data.loaders import Batches
from tailaug.data.natural import (DrawKey, NaturalTransform, crop_box, decode_on_device, draws, jitter_batch,
                                  jitter_in_order, pipeline)
from tailaug.data.sources import ImageFolderDataset
from tailaug.data.transforms import BatchTransform
from tailaug.errors import ConfigError
from tailaug.stages.stage1_model import preprocessing

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16  # crops of the 40 x 30 test images
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """20 JPEGs of 40 x 30 (smooth colour fields plus a little noise) and a PNG."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:30, 0:40]
    paths = []
    for i in range(20):
        a, b, c = rng.uniform(0.05, 0.3, 3)
        field = np.stack([128 + 100 * np.sin(a * xx + i), 128 + 100 * np.cos(b * yy),
                          128 + 90 * np.sin(c * (xx + yy))], -1)
        image = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
        paths.append(root / f"{i:02d}.jpg")
        Image.fromarray(image).save(paths[-1], quality=90)
    png = root / "extra.png"
    Image.fromarray(np.asarray(Image.open(paths[0]))).save(png)
    return paths, png


def dataset(paths, **kw) -> ImageFolderDataset:
    t = NaturalTransform(SIZE, **kw)
    return ImageFolderDataset(paths, np.arange(len(paths)) % 3, SIZE, natural=t)


def epoch_views(ds, *, workers=0, epoch=0, seed=3, rank=0, augment=True, batch_size=6) -> torch.Tensor:
    split = Split(ds.labels, dataset=ds)
    batches = Batches(split, batch_size, BatchTransform((0.5,) * 3, (0.5,) * 3, 0, False), CPU, augment=augment,
                      seed=seed, rank=rank, num_workers=workers, prefetch_factor=2)
    batches.set_epoch(epoch)
    out = [(x, idx) for x, _, idx in batches.raw()]
    assert torch.equal(torch.cat([i for _, i in out]), torch.arange(len(ds)))
    return torch.cat([x for x, _ in out])


# --------------------------------------------------------------------------- views and draws


def test_training_and_evaluation_views_are_uint8_crops_of_the_image_size(jpegs):
    ds = dataset(jpegs[0])
    train = torch.stack([ds.view(i, DrawKey(0, 0, 0)) for i in range(20)])
    test = torch.stack([ds[i][0] for i in range(20)])
    for views in (train, test):
        assert views.shape == (20, 3, SIZE, SIZE) and views.dtype == torch.uint8
        assert views.min() >= 0 and views.max() <= 255 and views.float().std() > 20  # not blank
    assert not torch.equal(train, test)
    assert ds[4][1] == 1


@pytest.mark.parametrize("h, w", [(30, 40), (40, 30), (7, 7), (1, 50), (300, 4), (375, 500)])
def test_random_resized_crops_stay_inside_the_image(h, w):
    rng = np.random.default_rng(1)
    for _ in range(300):
        scale = np.sort(rng.uniform(0.01, 1, 2))
        top, left, ch, cw = crop_box(h, w, rng.random(29), scale)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch >= 1 and cw >= 1


def test_random_resized_crops_follow_scale_and_ratio():
    h, w = 375, 500
    boxes = np.array([crop_box(h, w, draws(DrawKey(0, 0, 0), i), (0.08, 1.0)) for i in range(2000)])
    area, aspect = boxes[:, 2] * boxes[:, 3] / (h * w), boxes[:, 3] / boxes[:, 2]
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1 and aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    assert area.min() < 0.15 and area.max() > 0.85  # the range is used
    assert np.unique(boxes[:, 0]).size > 50 and np.unique(boxes[:, 1]).size > 50  # positions vary
    # no try fits: the centre crop, the aspect ratio clamped into [3/4, 4/3]
    assert crop_box(30, 40, np.full(29, 0.5), (1.0, 1.0)) == (0, 0, 30, 40)
    assert crop_box(10, 100, np.full(29, 0.5), (1.0, 1.0)) == (0, 43, 10, 13)
    assert crop_box(100, 10, np.full(29, 0.5), (1.0, 1.0)) == (43, 0, 13, 10)


def hand_training_view(path, d, flip=True) -> torch.Tensor:
    top, left, ch, cw = d.box
    img = Image.open(path).convert("RGB").crop((left, top, left + cw, top + ch)).resize((SIZE, SIZE), Image.BILINEAR)
    array = np.asarray(img)
    if flip and d.flip:
        array = array[:, ::-1]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def test_a_training_view_is_the_resized_crop_and_flip_of_its_draws_and_jitter_0_is_none(jpegs):
    paths = jpegs[0]
    plain, jittered = dataset(paths, jitter=0.0), dataset(paths, jitter=0.4)
    flips = set()
    for i in range(20):
        key = DrawKey(5, 2, 1)
        d = plain.natural.draw(30, 40, key, i)
        assert d.factors == (1.0, 1.0, 1.0)
        assert torch.equal(plain.view(i, key), hand_training_view(paths[i], d))
        dj = jittered.natural.draw(30, 40, key, i)
        assert dj.box == d.box and dj.flip == d.flip and dj.order == d.order  # jitter changes no other draw
        assert all(0.6 <= f <= 1.4 for f in dj.factors)
        hand = jitter_in_order(hand_training_view(paths[i], d)[None].float(), dj.factors, dj.order)
        assert torch.equal(jittered.view(i, key), hand[0].round().to(torch.uint8))
        flips.add(d.flip)
    assert flips == {True, False}
    no_flip = dataset(paths, jitter=0.0, flip=False)
    d = no_flip.natural.draw(30, 40, DrawKey(5, 2, 1), 0)
    assert torch.equal(no_flip.view(0, DrawKey(5, 2, 1)), hand_training_view(paths[0], d, flip=False))


def test_colour_jitter_formulas():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (1, 3, 2, 3))
    b, c, s = 1.3, 0.7, 1.2
    luma = lambda a: 0.299 * a[:, 0:1] + 0.587 * a[:, 1:2] + 0.114 * a[:, 2:3]  # noqa: E731
    hand = np.clip(x * b, 0, 255)
    hand = np.clip((hand - luma(hand).mean()) * c + luma(hand).mean(), 0, 255)
    hand = np.clip((hand - luma(hand)) * s + luma(hand), 0, 255)
    out = jitter_in_order(torch.from_numpy(x), (b, c, s), (0, 1, 2))
    np.testing.assert_allclose(out.numpy(), hand, rtol=1e-10)
    # the order matters, and factors of 1 change nothing
    assert not torch.allclose(jitter_in_order(torch.from_numpy(x), (b, c, s), (2, 1, 0)), out)
    torch.testing.assert_close(jitter_in_order(torch.from_numpy(x), (1.0, 1.0, 1.0), (1, 2, 0)), torch.from_numpy(x))
    # the batched form (each image its own factors and order) is the same as one image at a time
    xs = torch.from_numpy(rng.uniform(0, 255, (6, 3, 4, 5)))
    factors = torch.from_numpy(rng.uniform(0.6, 1.4, (6, 3)))
    orders = torch.stack([torch.randperm(3) for _ in range(6)])
    expected = torch.cat([jitter_in_order(xs[i:i + 1].clone(), factors[i].tolist(), orders[i].tolist())
                          for i in range(6)])
    torch.testing.assert_close(jitter_batch(xs.clone(), factors, orders), expected)


def test_the_evaluation_view_is_the_shorter_side_resized_then_the_centre_crop(jpegs):
    path = jpegs[0][7]
    ds = dataset([path])
    assert ds.natural.eval_resize == 18  # 16 / 0.875
    # 40 x 30 -> 24 x 18, then the centre 16 x 16: columns 4..19, rows 1..16
    hand = np.asarray(Image.open(path).convert("RGB").resize((24, 18), Image.BILINEAR))[1:17, 4:20]
    assert torch.equal(ds[0][0], torch.from_numpy(hand.copy()).permute(2, 0, 1))
    assert torch.equal(ds.view(0), ds[0][0])
    assert NaturalTransform(224).eval_resize == 256 and NaturalTransform(224, eval_ratio=1.0).eval_resize == 224


# --------------------------------------------------------------------------- determinism


def test_an_epoch_is_the_same_with_0_1_or_2_workers_and_after_a_resume(jpegs):
    ds = dataset(jpegs[0])
    split = Split(ds.labels, dataset=ds)
    transform = BatchTransform((0.5,) * 3, (0.5,) * 3, 0, False)
    runs = {}
    for workers in (0, 1, 2):  # one Batches over three epochs (persistent workers)
        batches = Batches(split, 6, transform, CPU, augment=True, seed=3, num_workers=workers, prefetch_factor=2)
        runs[workers] = []
        for epoch in range(3):
            batches.set_epoch(epoch)
            runs[workers].append(torch.cat([x for x, _, _ in batches.raw()]))
    for workers in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[workers]))
    assert torch.equal(epoch_views(ds, workers=2, epoch=2), runs[0][2])  # a fresh loader: a resumed run
    assert not torch.equal(runs[0][0], runs[0][1]) and not torch.equal(runs[0][1], runs[0][2])
    assert not torch.equal(epoch_views(ds, rank=1), runs[0][0])
    assert not torch.equal(epoch_views(ds, seed=4), runs[0][0])
    # a view depends on its dataset index only, not on the batch it comes in
    assert torch.equal(epoch_views(ds, batch_size=7), runs[0][0])


def test_evaluation_is_deterministic_and_ignores_seed_and_epoch(jpegs):
    ds = dataset(jpegs[0])
    reference = torch.stack([ds[i][0] for i in range(20)])
    assert torch.equal(epoch_views(ds, augment=False), reference)
    assert torch.equal(epoch_views(ds, augment=False, workers=2, epoch=3, seed=9), reference)


def test_a_training_view_is_the_same_in_every_worker(jpegs):
    ds = dataset(jpegs[0])
    items = loaders._Items(ds, encoded=False)
    key = DrawKey(1, 2, 0)
    assert torch.equal(items[(4, key)][0], ds.view(4, key))  # the draws: (seed, epoch, rank, index)
    assert items[(4, None)][1:] == (1, 4)


# --------------------------------------------------------------------------- decoding on the GPU


def test_gpu_decode_path_gives_the_workers_views(jpegs):
    """The device path (here on the CPU) decodes, crops, flips and jitters like the workers, but
    for the resampler's rounding; a file nvjpeg cannot read (PNG) is finished in the worker."""
    paths, png = jpegs
    ds = dataset([*paths, png])
    for key in (DrawKey(2, 1, 0), None):
        items = [ds.encoded(i, key) for i in range(21)]
        assert [e.data.ndim for e in items] == [1] * 20 + [3]
        out = decode_on_device(items, ds.natural, CPU)
        expected = torch.stack([ds.view(i, key) for i in range(21)])
        assert out.shape == (21, 3, SIZE, SIZE) and out.dtype == torch.uint8
        assert (out.int() - expected.int()).abs().max() <= 2
        assert torch.equal(out[20], expected[20])


def test_gpu_decode_keeps_every_tensor_on_the_batch_device(jpegs, monkeypatch):
    """Decoded images on the 'meta' device: any tensor of the device path made elsewhere
    (e.g. on the CPU) fails to mix with them; the decoder is asked for the batch's device."""
    ds = dataset(jpegs[0][:5])
    asked = []

    def fake_decode(data, device):
        asked.append(device)
        return [torch.empty((3, 30, 40), dtype=torch.uint8, device=device) for _ in data]

    monkeypatch.setattr(natural, "decode_jpegs", fake_decode)
    meta = torch.device("meta")
    for key in (DrawKey(0, 0, 0), None):
        out = decode_on_device([ds.encoded(i, key) for i in range(5)], ds.natural, meta)
        assert out.device == meta and out.shape == (5, 3, SIZE, SIZE) and out.dtype == torch.uint8
    assert asked == [meta, meta]
    # and torchvision's decoder gets the device argument (its input stays on the CPU, as it requires)
    import torchvision.io

    calls = []
    monkeypatch.undo()
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, **kw: calls.append((data, kw)) or [])
    natural.decode_jpegs([ds.encoded(0).data], torch.device("cuda"))
    (data, kw), = calls
    assert kw["device"] == torch.device("cuda") and data[0].device.type == "cpu"


def test_batches_decode_on_the_device_with_workers(jpegs, monkeypatch):
    ds = ImageFolderDataset(jpegs[0], np.zeros(20), SIZE, natural=NaturalTransform(SIZE), gpu_decode=True)
    split = Split(ds.labels, dataset=ds)
    transform = BatchTransform((0.5,) * 3, (0.5,) * 3, 0, False)
    with pytest.raises(ConfigError, match="data.gpu_decode decodes the JPEGs on a CUDA device, and this run uses cpu"):
        Batches(split, 6, transform, CPU, augment=True)
    monkeypatch.setattr(loaders, "check_gpu_decode", lambda *a: None)  # a CPU stand-in for the GPU
    batches = Batches(split, 6, transform, CPU, augment=True, seed=3, num_workers=2, prefetch_factor=2)
    out = torch.cat([x for x, _, _ in batches.raw()])
    expected = epoch_views(dataset(jpegs[0]))
    assert out.dtype == torch.uint8 and (out.int() - expected.int()).abs().max() <= 2


# --------------------------------------------------------------------------- config


FOLDER = ["data.dataset=image_folder", "data.root=/data"]


def test_auto_is_natural_for_image_files_and_small_for_the_built_in_sets(jpegs):
    assert pipeline(load_config(None, FOLDER).data) == "natural"
    assert pipeline(load_config(None, [*FOLDER, "data.transforms=small"]).data) == "small"
    for name in ("cifar10", "cifar100", "fashion_mnist", "mnist"):
        assert pipeline(load_config(None, [f"data.dataset={name}"]).data) == "small"
    assert pipeline(load_config(None, ["data.dataset=embeddings", "data.embeddings={train: a.npz}"]).data) is None
    cfg = load_config(None, [*FOLDER, "data.image_size=20", "data.crop_scale=[0.3, 0.9]", "data.color_jitter=0.2",
                             "data.eval_crop_ratio=0.8", "data.flip=false"])
    assert cfg.data.prefetch_factor == 4 and cfg.data.gpu_decode is False
    ds = image_files_dataset(cfg.data, jpegs[0], np.zeros(20))
    assert ds.natural == NaturalTransform(20, (0.3, 0.9), False, 0.2, 0.8) and ds.natural.eval_resize == 25
    small = image_files_dataset(load_config(None, [*FOLDER, "data.transforms=small"]).data, jpegs[0], np.zeros(20))
    assert small.natural is None and small[0][0].shape == (3, 224, 224)
    # the batch transform only normalises natural views; small ones it crops and flips
    assert (preprocessing(cfg, (0.5,), (0.5,)).padding, preprocessing(cfg, (0.5,), (0.5,)).flip) == (0, False)
    default = load_config(None, [])
    assert (preprocessing(default, (0.5,), (0.5,)).padding, preprocessing(default, (0.5,), (0.5,)).flip) == (4, True)


@pytest.mark.parametrize("overrides, message", [
    (["data.crop_scale=[0.5, 0.2]"], "data.crop_scale = [0.5, 0.2]: must be [min, max] with 0 < min <= max <= 1"),
    (["data.crop_scale=[0, 1]"], "data.crop_scale = [0.0, 1.0]: must be [min, max] with 0 < min <= max <= 1"),
    (["data.crop_scale=[0.5, 1.5]"], "data.crop_scale = [0.5, 1.5]: must be [min, max]"),
    (["data.crop_scale=[0.5]"], "data.crop_scale = [0.5]: must be [min, max]"),
    (["data.eval_crop_ratio=0"], "data.eval_crop_ratio = 0: Input should be greater than 0"),
    (["data.eval_crop_ratio=1.2"], "data.eval_crop_ratio = 1.2: Input should be less than or equal to 1"),
    (["data.color_jitter=-0.1"], "data.color_jitter = -0.1: Input should be greater than or equal to 0"),
    (["data.prefetch_factor=0"], "data.prefetch_factor = 0: Input should be greater than or equal to 1"),
    (["data.transforms=natural"], "data.transforms = 'natural': is the pipeline of image files; fashion_mnist is a "
                                  "built-in set of small images held in memory: use small (or auto)"),
    (["data.gpu_decode=true"], "decodes image files for data.transforms natural, and this config's pipeline is "
                               "small: remove data.gpu_decode"),
    ([*FOLDER, "data.gpu_decode=true", "run.device=cpu"],
     "data.gpu_decode decodes the JPEGs on a CUDA device, and run.device is cpu: set data.gpu_decode: false"),
    ([*FOLDER, "train.loss=[{name: supcon}]"], "supcon pairs two augmented views of each image, and the natural "
                                               "pipeline's loader makes one per image"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    ([*FOLDER, "data.crop_padding=1"], "data.crop_padding = 1: is read by the small pipeline only, and this config's "
                                       "is natural (data.transforms auto for image files): remove data.crop_padding, "
                                       "or set data.transforms: small"),
    ([*FOLDER, "data.transforms=small", "data.crop_scale=[0.5, 1]"],
     "data.crop_scale = [0.5, 1.0]: is read by the natural pipeline only, and this config's is small "
     "(data.transforms): remove data.crop_scale, or set data.transforms: natural"),
    (["data.color_jitter=0"], "data.color_jitter = 0.0: is read by the natural pipeline only, and this config's is "
                              "small (fashion_mnist is a built-in set): remove data.color_jitter"),
    (["data.dataset=cifar10", "data.eval_crop_ratio=1"], "data.eval_crop_ratio = 1.0: is read by the natural "
                                                         "pipeline only"),
])
def test_a_key_the_pipeline_does_not_read_is_an_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_the_keys_of_the_other_pipeline_at_their_defaults_are_accepted():
    """A saved config.yaml lists every key, those of the other pipeline at their defaults."""
    for overrides in (FOLDER, [*FOLDER, "data.transforms=small"], ["data.dataset=cifar100"]):
        cfg = load_config(None, overrides)
        assert validate_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert load_config(None, [*FOLDER, "data.transforms=small", "data.crop_padding=2"]).data.crop_padding == 2
    assert load_config(None, [*FOLDER, "data.color_jitter=0"]).data.color_jitter == 0


def test_gpu_decode_without_a_gpu_is_an_error_at_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from tailaug.stages.representation import Trainer

    cfg = load_config(None, [*FOLDER, "data.gpu_decode=true"])  # run.device auto: the CPU here
    with pytest.raises(ConfigError, match="data.gpu_decode decodes the JPEGs on a CUDA device, and this run uses cpu"):
        Trainer(cfg, "unused", progress=False)  # before any image is read (data.root does not exist)
