"""The sharded, memory-mapped feature cache (features.shard_rows, features.dtype) and stage 3
streaming from it."""

import json
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tailaug import commands
from tailaug.augment.base import build_augmenter
from tailaug.config import RetrainConfig, STGConfig, load_config
from tailaug.engine.shards import ShardedArray, ShardWriter
from tailaug.engine.inference import iter_outputs
from tailaug.errors import CheckpointError, ConfigError, TailaugError
from tailaug.models import Output
from tailaug.stages import features as features_stage
from tailaug.stages.classifier import retrain_classifier
from tailaug.stages.feature_cache import (dense_cache, find_cache, legacy_cache_path, load_cache,
                                          training_features, write_cache)
from tailaug.stages.generator import train_generator
from tailaug.stages.keys import features_key
from tailaug.stages.stage1_model import Stage1Model

from synthetic import gaussian_feature_cache, long_tail_embeddings

FIX = "and rerun: the features are extracted again from the stage-1 checkpoint"


def full_cache(val_per_class=5) -> dict:
    cache = gaussian_feature_cache(val_per_class=val_per_class)
    g = torch.Generator().manual_seed(1)
    for split in ("test", "val"):
        if f"{split}_features" in cache:
            cache[f"{split}_logits"] = torch.randn(len(cache[f"{split}_labels"]), 3, generator=g)
    return cache


def written(tmp_path, shard_rows=7, dtype="float32", cache=None):
    cache = full_cache() if cache is None else cache
    return cache, load_cache(write_cache(tmp_path / f"c{shard_rows}{dtype}", cache, shard_rows, dtype))


def test_a_sharded_cache_gives_exactly_the_rows_of_an_unsharded_one(tmp_path):
    cache, sharded = written(tmp_path, shard_rows=7)
    _, whole = written(tmp_path, shard_rows=10_000)
    x = cache["train_features"]
    a, b = sharded["train_features"], whole["train_features"]
    assert isinstance(a, ShardedArray) and (a.num_shards, b.num_shards) == (8, 1) and a.shape == (54, 4)
    assert [json.loads((tmp_path / "c7float32/index.json").read_text())["arrays"]["train_features"]["shards"][i]
            ["rows"] for i in (0, 7)] == [7, 5]
    rows = torch.tensor([53, 0, 6, 7, 7, 20, 13, 14, 1, 48])  # unsorted, repeated, across shard edges
    mask = torch.arange(54) % 3 == 0
    for array in (a, b):
        assert torch.equal(array.tensor(), x) and torch.equal(array[rows], x[rows]) and torch.equal(array[mask], x[mask])
        assert torch.equal(array[5:23], x[5:23]) and torch.equal(array[50:99], x[50:]) and array[9:9].shape == (0, 4)
        assert torch.equal(torch.cat(list(array.chunks(11))), x)
    assert all(torch.equal(v if isinstance(v, torch.Tensor) else v, cache[k]) for k, v in dense_cache(sharded).items())
    with pytest.raises(TypeError, match="index a ShardedArray with a slice"):
        a[3]


def test_extraction_writes_shard_by_shard_and_reads_back_the_same_features(tmp_path, monkeypatch):
    """extract_features with a stand-in stage 1: training rows (plus one augmented view), val and
    test, written as they come; no more than one unwritten shard is ever held."""
    cfg = load_config(None, ["features.shard_rows=20", "features.batch_size=5", "features.views=1"])
    full = full_cache()
    seen = []

    class Stage1:
        data = SimpleNamespace(train="train", val="val", test="test", class_counts=[40, 10, 4])
        model = SimpleNamespace(head=torch.nn.Linear(4, 3))

        def batches_out(self, split, batch_size, *, augment=False, seed=0, keys=None):
            x = full[f"{split}_features"] + (1.0 if augment else 0.0)
            for start in range(0, len(x), batch_size):
                stop = start + batch_size
                files = list((tmp_path / "features").rglob("*.npy"))
                seen.append((split, start, len(files)))
                out = {"features": x[start:stop], "labels": full[f"{split}_labels"][start:stop],
                       "index": torch.arange(len(x))[start:stop], "logits": torch.zeros(len(x[start:stop]), 3)}
                yield {k: out[k] for k in keys}  # only what extraction asks for

    monkeypatch.setattr(features_stage, "load_finished", lambda *a: Stage1())
    cache = features_stage.extract_features(cfg, tmp_path, progress=False)
    assert torch.equal(cache["train_features"].tensor(), torch.cat([full["train_features"], full["train_features"] + 1]))
    assert torch.equal(cache["val_features"].tensor(), full["val_features"])
    assert torch.equal(cache["train_index"], torch.arange(54).repeat(2)) and cache["train_features"].num_shards == 6
    # when the 9th training batch (rows 40-44) is asked for, the shards of rows 0-39 are on disk
    assert ("train", 40, 2) in seen
    assert find_cache(tmp_path, cfg) == tmp_path / "features" / features_key(cfg)
    writer = ShardWriter(tmp_path / "w", "x", shard_rows=7)
    writer.append(torch.zeros(100, 3))
    assert writer.block.shape == (7, 3) and len(writer.shards) == 14 and writer.filled == 2


class _Moved(torch.Tensor):
    """Logits that record each move to the host (``.cpu()``) under their split's name."""

    moves: list = []

    def float(self):
        out = super().float()
        out.origin = self.origin
        return out

    def cpu(self, *a, **kw):
        _Moved.moves.append(self.origin)
        return super().cpu(*a, **kw).as_subclass(torch.Tensor)  # on the host: a plain tensor


def test_extraction_moves_to_the_host_only_what_the_cache_keeps(tmp_path, monkeypatch):
    """The real Stage1Model.batches_out and iter_outputs with a stand-in network: the training
    split's logits (dropped by the cache) never reach .cpu(); val/test logits do and are cached."""
    cfg = load_config(None, ["features.shard_rows=20", "features.batch_size=8", "features.views=1"])
    full = full_cache()
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))

    class Net(torch.nn.Module):
        head = torch.nn.Linear(4, 3)

        def forward(self, x):
            split, feats = x
            logits = (feats @ weight.T).as_subclass(_Moved)
            logits.origin = split
            return Output(feats, logits)

    class Stage1(Stage1Model):
        def _batches(self, split, batch_size, augment, seed):
            x = full[f"{split}_features"] + (1.0 if augment else 0.0)
            return [((split, x[s:s + batch_size]), full[f"{split}_labels"][s:s + batch_size],
                     torch.arange(len(x))[s:s + batch_size]) for s in range(0, len(x), batch_size)]

    data = SimpleNamespace(train="train", val="val", test="test", class_counts=[40, 10, 4])
    stage1 = Stage1(cfg, data, Net(), None, torch.device("cpu"), None)
    monkeypatch.setattr(_Moved, "moves", [])
    monkeypatch.setattr(features_stage, "load_finished", lambda *a: stage1)
    cache = features_stage.extract_features(cfg, tmp_path, progress=False)
    assert _Moved.moves == ["val"] * 2 + ["test"] * 8  # 15 and 60 rows in batches of 8; no "train"
    assert torch.equal(cache["train_features"].tensor(), torch.cat([full["train_features"], full["train_features"] + 1]))
    assert "train_logits" not in cache and torch.equal(cache["train_index"], torch.arange(54).repeat(2))
    for split in ("val", "test"):
        assert torch.allclose(cache[f"{split}_logits"].tensor(), full[f"{split}_features"] @ weight.T)
    got = next(iter_outputs(Net(), stage1._batches("val", 5, False, 0), torch.device("cpu"), keys=("labels",)))
    assert list(got) == ["labels"] and torch.equal(got["labels"], full["val_labels"][:5])
    with pytest.raises(TailaugError, match=r"cannot return 'probs'; ask for some of features, logits, labels, index"):
        next(iter_outputs(Net(), [], torch.device("cpu"), keys=("features", "probs")))


def test_float16_storage_rounds_to_float16_halves_the_files_and_changes_the_key(tmp_path):
    cache, f32 = written(tmp_path, shard_rows=10, dtype="float32")
    _, f16 = written(tmp_path, shard_rows=10, dtype="float16")
    x = cache["train_features"]
    half = f16["train_features"]
    assert half.dtype == torch.float16 and half.tensor().dtype == torch.float32
    assert torch.equal(half.tensor(), x.half().float())
    assert torch.allclose(half.tensor(), x, rtol=2**-11, atol=0)
    assert torch.equal(f16["test_logits"].tensor(), cache["test_logits"])  # logits stay float32

    def data_bytes(array):
        return sum(p.stat().st_size - 128 for p in array.files)  # a .npy header of these shapes is 128 bytes

    assert data_bytes(half) * 2 == data_bytes(f32["train_features"]) == 54 * 4 * 4
    keys = {features_key(load_config(None, o)) for o in ([], ["features.shard_rows=7"], ["features.dtype=float32"])}
    assert len(keys) == 1 and features_key(load_config(None, ["features.dtype=float16"])) not in keys
    with pytest.raises(ConfigError, match=r"beyond float16's 65504; set features.dtype: float32"):
        ShardWriter(tmp_path, "big", 4, "float16").append(torch.tensor([[1e6, 0.0]]))


def _damage(directory, how):
    shard = directory / "train_features-00003.npy"
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-9])
    elif how == "header":
        shard.write_bytes(b"\x00" * shard.stat().st_size)
    elif how == "index":
        (directory / "index.json").write_text("{not json")
    elif how == "entries":
        (directory / "entries.safetensors").unlink()
    return shard


@pytest.mark.parametrize("how, problem", [
    ("missing", r"feature cache shard \S+train_features-00003.npy is missing"),
    ("truncated", r"feature cache shard \S+train_features-00003.npy has 231 bytes where the index records 240 "
                  r"\(truncated or overwritten\)"),
    ("header", r"feature cache shard \S+train_features-00003.npy is not a readable .npy file \(ValueError: "),
    ("index", r"feature cache index \S+index.json cannot be read \(JSONDecodeError: "),
    ("entries", r"feature cache file \S+entries.safetensors is missing"),
])
def test_a_damaged_shard_is_one_error_naming_the_file_and_the_fix(tmp_path, how, problem):
    directory = write_cache(tmp_path / "cache", full_cache(), 7, "float32")
    load_cache(directory)
    _damage(directory, how)
    with pytest.raises(CheckpointError, match=problem) as info:
        load_cache(directory)
    assert str(info.value).endswith(f"; delete the directory {directory} {FIX}")
    assert "\n" not in str(info.value)


def test_rows_by_index_come_the_same_through_the_map_and_a_shard_cut_later_is_an_error(tmp_path, monkeypatch):
    from tailaug.engine import shards

    cache, loaded = written(tmp_path, shard_rows=7)
    x, rows = cache["train_features"], torch.tensor([53, 0, 6, 7, 7, 20, 13, 14, 1, 48])
    with monkeypatch.context() as m:
        m.delattr(shards.os, "preadv")  # as on Windows
        assert torch.equal(loaded["train_features"][rows], x[rows])
    shard = loaded["train_features"].files[2]
    shard.write_bytes(shard.read_bytes()[:-16])  # after it was opened and checked
    with pytest.raises(CheckpointError, match=rf"shard {shard} ended early \(truncated since it was opened\); delete "
                                              "the directory"):
        loaded["train_features"][rows]


def test_loading_maps_the_shards_and_reads_nothing(tmp_path):
    x = torch.randn(20_000, 64)
    cache = {"train_features": x, "train_labels": torch.zeros(20_000, dtype=torch.long),
             "train_index": torch.arange(20_000), "test_features": x[:10], "test_labels": torch.zeros(10).long(),
             "test_logits": torch.zeros(10, 2), "class_counts": torch.tensor([20_000, 1]),
             "head_weight": torch.zeros(2, 64), "head_bias": torch.zeros(2)}
    directory = write_cache(tmp_path / "big", cache, 4096, "float32")
    tracemalloc.start()
    loaded = load_cache(directory)
    rows = loaded["train_features"][torch.tensor([5, 19_999, 4096])]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    array = loaded["train_features"]
    assert peak < x.numel() * 4 / 20  # 5.1 MB of features: neither read nor copied
    assert torch.equal(rows, x[[5, 19_999, 4096]])
    shards = array._store.arrays
    assert len(shards) == 5 and all(not a.flags.owndata and not a.flags.writeable for a in shards)


def _fit(x, y, counts, method="crt", augmenter=None, val=None, generator=None, **kw):
    cfg = RetrainConfig(method=method, epochs=3, batch_size=16, lr=0.05)
    aug = None if augmenter is None else build_augmenter(augmenter, generator_module=generator)
    return retrain_classifier(x, y, counts, cfg, num_classes=3, seed=4, augmenter=aug, val=val, head_classes=[0],
                              progress=False, **kw)


@pytest.mark.parametrize("method, augmenter", [
    ("crt", None), ("lws", None), ("ncm", None), ("crt", {"name": "noise", "std": 0.5}),
    ("crt", {"name": "isda", "lambda0": 1.0}), ("lws", {"name": "isda", "lambda0": 1.0, "covariance": "diagonal"}),
    ("crt", {"name": "fasa"}), ("crt", {"name": "metasaug", "meta_batch": 6}), ("crt", {"name": "stg", "lam": 1.0}),
])
def test_stage3_streamed_from_the_sharded_cache_equals_stage3_in_memory(tmp_path, monkeypatch, method, augmenter):
    cache, loaded = written(tmp_path, shard_rows=7)
    counts, val = cache["class_counts"], (cache["val_features"], cache["val_labels"])
    generator = None
    if augmenter and augmenter["name"] == "stg":
        generator = train_generator(cache["train_features"], cache["train_labels"], None, counts,
                                    STGConfig(epochs=2, memory_size=8, head={"rule": "top_k", "top_k": 1}),
                                    seed=0, progress=False)[0]
    head = {"init_weight": cache["head_weight"], "init_bias": cache["head_bias"]}
    memory = _fit(cache["train_features"], cache["train_labels"], counts, method, augmenter, val, generator, **head)
    gathered = []
    real = ShardedArray._gather
    monkeypatch.setattr(ShardedArray, "_gather", lambda self, i: gathered.append(len(i)) or real(self, i))
    monkeypatch.setattr(ShardedArray, "tensor", lambda self: pytest.fail("the training rows were read whole"))
    streamed = _fit(loaded["train_features"], cache["train_labels"], counts, method, augmenter, val, generator, **head)
    state, again = memory.state_dict(), streamed.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    untimed = [[{k: v for k, v in r.items() if k != "augment_s"} for r in m.history] for m in (memory, streamed)]
    assert untimed[0] == untimed[1]  # losses and validation accuracy of every epoch
    if method != "ncm":
        assert len(gathered) >= 3 * 4 and max(gathered) <= 16  # every batch read by its rows (plus appended ones)


def test_stage3_streams_above_shard_rows_and_holds_smaller_caches_in_memory(tmp_path):
    _, loaded = written(tmp_path, shard_rows=7)
    cfg = load_config(None, ["features.shard_rows=53"])
    assert isinstance(training_features(loaded, cfg), ShardedArray)
    held = training_features(loaded, load_config(None, ["features.shard_rows=54"]))
    assert isinstance(held, torch.Tensor) and held.shape == (54, 4)


def test_an_earlier_single_file_cache_is_still_loaded(tmp_path):
    from safetensors.torch import save_file

    cfg = load_config(None, [])
    cache = full_cache()
    path = legacy_cache_path(tmp_path, cfg)
    path.parent.mkdir(parents=True)
    save_file(cache, str(path))
    assert find_cache(tmp_path, cfg) == path
    loaded = features_stage.extract_features(cfg, tmp_path, progress=False)
    assert all(isinstance(v, torch.Tensor) and torch.equal(v, cache[k]) for k, v in loaded.items())
    assert find_cache(tmp_path, load_config(None, ["features.dtype=float16"])) is None  # another key


def _embeddings_run(root, name, *overrides):
    tree = {"run": {"output_dir": str(root / "runs"), "name": name, "device": "cpu"},
            "data": {"dataset": "embeddings", "root": str(root),
                     "embeddings": {"train": "train.npz", "test": "test.npz"}}}
    (root / "cfg.yaml").write_text(json.dumps(tree))
    fast = ["train.epochs=10", "train.lr=0.05", "train.batch_size=64", "retrain.epochs=4", "retrain.lr=0.05",
            "retrain.batch_size=64", "data.shots.many=60", "data.shots.few=15", "train.precision=fp32",
            "retrain.augmenter={name: isda, covariance: diagonal}", *overrides]
    return commands.run(str(root / "cfg.yaml"), fast, progress=False), root / "runs" / name


def test_the_pipeline_streams_a_sharded_cache_and_runs_with_float16_features(tmp_path):
    x, y, xt, yt = long_tail_embeddings([150, 80, 40, 20, 10, 6], dim=8, spread=1.0, test_per_class=40)
    np.savez(tmp_path / "train.npz", features=x, labels=y)
    np.savez(tmp_path / "test.npz", features=xt, labels=yt)
    memory, _ = _embeddings_run(tmp_path, "memory")
    streamed, run_dir = _embeddings_run(tmp_path, "streamed", "features.shard_rows=50")
    assert streamed == memory  # every row: the same classifiers from the mapped shards
    (index,) = (run_dir / "features").glob("*/index.json")
    assert len(json.loads(index.read_text())["arrays"]["train_features"]["shards"]) == 7  # 306 rows

    half, run_dir = _embeddings_run(tmp_path, "half", "features.shard_rows=50", "features.dtype=float16")
    (index,) = (run_dir / "features").glob("*/index.json")
    assert json.loads(index.read_text())["arrays"]["train_features"]["dtype"] == "float16"
    assert list(half) == ["stage 1", "cRT", "cRT + ISDA"] and all(r["top1"] > 50 for r in half.values())  # chance 16.7
    assert half["stage 1"] == memory["stage 1"]  # the head trains on the embeddings; its logits stay float32
