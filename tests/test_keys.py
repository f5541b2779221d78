"""Each artefact's key changes with exactly the fields that change the artefact."""

import pytest

from tailaug.config import DataConfig, ModelConfig, TrainConfig, load_config
from tailaug.errors import ConfigError
from tailaug.stages.keys import NOT_IN_STAGE1, features_key, generator_key, retrain_key, stage1_key

FOLDER = ("data.dataset=image_folder", "data.root=/data", "data.train_split=train.txt",
          "data.test_split=test.txt")
LAYOUT = ("data.dataset=image_folder", "data.root=/data")  # root/<class>/*.jpg
PUBLISHED_SET = ("data.dataset=imagenet_lt", "data.root=/data")  # the published split files
COSINE = ("model.head=cosine",)
EMB = ("data.dataset=embeddings", "data.embeddings={train: a.npz}")
EMB_TEST = ("data.dataset=embeddings", "data.embeddings={train: a.npz, test: t.npz}")
TIMM = ("model.arch=timm", "model.name=tf_efficientnet_lite0")

# (override, base overrides, does it change the stage-1 model?)
STAGE1_CASES = [
    ("run.seed=1", (), True),
    ("data.dataset=mnist", (), True),
    ("data.profile=step", (), True),
    ("data.imbalance_factor=50", (), True),
    ("data.n_max=300", (), True),
    ("data.lt_seed=1", (), True),
    ("data.val_per_class=5", (), True),
    ("data.class_order=[1, 8, 9, 5, 7, 3, 0, 2, 4, 6]", (), True),
    ("data.class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]", (), False),  # the protocol's order: the same subset
    ("data.class_order=[1, 8, 9, 5, 7, 3, 0, 2, 4, 6]", ("data.profile=none",), False),  # all classes n_max
    ("data.crop_padding=2", (), True),
    ("data.flip=false", (), True),
    ("data.train_split=other.txt", FOLDER, True),
    ("data.val_split=val.txt", FOLDER, True),
    ("data.num_classes=5", FOLDER, True),
    ("data.image_size=32", FOLDER, True),
    ("data.image_size=32", (), False),  # built-in datasets are not resized
    ("data.profile=step", LAYOUT, True),  # re-profiled
    ("data.imbalance_factor=50", LAYOUT, False),  # as_is: its own counts
    ("data.imbalance_factor=50", (*LAYOUT, "data.profile=exponential"), True),
    ("data.n_max=5", (*LAYOUT, "data.profile=exponential"), True),
    ("data.lt_seed=1", LAYOUT, True),
    ("data.val_per_class=5", LAYOUT, True),
    ("data.test_per_class=5", LAYOUT, True),  # held out of the training images
    ("data.test_root=/test", LAYOUT, True),  # no test images held out any more
    ("data.test_root=/other", (*LAYOUT, "data.test_root=/test"), False),
    ("data.test_per_class=5", (*LAYOUT, "data.test_root=/test"), False),
    ("data.image_size=32", LAYOUT, True),
    # data.transforms: auto is natural for image files, small for the built-in sets
    ("data.transforms=natural", LAYOUT, False),
    ("data.transforms=small", LAYOUT, True),
    ("data.transforms=small", (), False),
    ("data.crop_padding=2", (*LAYOUT, "data.transforms=small"), True),
    ("data.flip=false", FOLDER, True),
    ("data.crop_scale=[0.35, 1.0]", FOLDER, True),
    ("data.color_jitter=0", LAYOUT, True),
    ("data.eval_crop_ratio=1.0", FOLDER, True),  # the evaluation view: the cached features
    ("data.prefetch_factor=2", FOLDER, False),
    ("data.gpu_decode=true", FOLDER, False),  # the same draws, another decoder
    ("data.train_split=other.txt", (), False),
    ("data.dataset=places_lt", PUBLISHED_SET, True),
    ("data.train_split=mine.txt", PUBLISHED_SET, True),  # instead of ImageNet_LT_train.txt
    ("data.val_split=mine.txt", PUBLISHED_SET, True),
    ("data.image_size=160", PUBLISHED_SET, True),
    ("data.test_split=mine.txt", PUBLISHED_SET, False),
    ("data.count_check=warn", PUBLISHED_SET, False),  # only accepts or refuses the files
    ("data.root=/elsewhere", (), False),
    ("data.download=true", (), False),
    ("data.num_workers=0", (), False),
    ("data.shots.many=50", (), False),
    ("data.shots.few=5", (), False),
    ("data.test_per_class=5", (), False),
    ("data.test_split=other.txt", FOLDER, False),
    ("model.arch=resnet20", (), True),
    ("model.in_channels=3", (), True),
    ("model.head=cosine", (), True),
    ("model.weights=init.pt", (), True),
    ("model.name=efficientnet_lite0", TIMM, True),
    ("model.mode=frozen", ("model.weights=init.pt",), True),
    ("model.cosine_scale=8", COSINE, True),
    ("model.cosine_scale=8", (), False),  # a linear head has no scale
    ("train.epochs=5", (), True),
    ("train.batch_size=64", (), True),
    ("train.lr=0.05", (), True),
    ("train.momentum=0.8", (), True),
    ("train.nesterov=true", (), True),
    ("train.weight_decay=0.001", (), True),
    ("train.warmup_epochs=0", (), True),
    ("train.schedule=cosine", (), True),
    ("train.milestones=[10, 20]", (), True),
    ("train.milestones=[10, 20]", ("train.schedule=cosine",), False),
    ("train.gamma=0.5", (), True),
    ("train.gamma=0.5", ("train.schedule=step",), True),
    ("train.gamma=0.5", ("train.schedule=cosine",), False),
    ("train.step_size=3", ("train.schedule=step",), True),
    ("train.step_size=3", (), False),
    ("train.min_lr=0.001", ("train.schedule=cosine",), True),
    ("train.min_lr=0.001", (), False),
    ("train.mixup_alpha=0.5", (), True),
    ("train.remix={}", ("train.mixup_alpha=1",), True),
    ("train.remix.kappa=4", ("train.mixup_alpha=1", "train.remix={}"), True),
    ("train.remix.tau=0.4", ("train.mixup_alpha=1", "train.remix={}"), True),
    ("train.stage_module={name: rsg}", (), True),
    ("train.stage_module.start_epoch=10", ("train.stage_module={name: rsg}",), True),
    ("train.loss=[{name: focal}]", (), True),
    ("train.loss.0.label_smoothing=0.1", (), True),
    ("train.reweight.scheme=inverse_frequency", (), True),
    ("train.reweight.start_epoch=3", ("train.reweight.scheme=inverse_frequency",), True),
    ("train.reweight.start_epoch=3", (), False),
    ("train.reweight.beta=0.999", ("train.reweight.scheme=effective_number",), True),
    ("train.reweight.beta=0.999", ("train.reweight.scheme=inverse_frequency",), False),
    ("train.sampler.kind=class_balanced", (), True),
    ("train.precision=bf16", (), True),
    ("train.grad_clip=1.0", (), True),
    ("train.feature_augmenter={name: fasa}", ("data.val_per_class=5",), True),
    ("train.feature_augmenter.ratio=1.0", ("data.val_per_class=5", "train.feature_augmenter={name: fasa}"), True),
    ("stg.head.rule=top_k", ("data.val_per_class=5", "train.feature_augmenter={name: fasa}"), True),
    ("train.feature_augmenter={name: none}", (), False),
    ("train.eval_batch_size=64", (), False),
    ("train.channels_last=false", (), False),
    ("train.checkpoint_every_steps=50", (), False),
    ("run.device=cpu", (), False),
    ("run.name=other", (), False),
    ("run.output_dir=elsewhere", (), False),
    ("eval.ece_bins=10", (), False),
    ("eval.logit_adjust_tau=1.0", (), False),
    ("features.views=2", (), False),
    ("stg.lr=0.01", (), False),
    ("retrain.lr=0.01", (), False),
    # given embeddings: stage 1 is a head on the training rows (stages/keys.embeddings_stage1_fields)
    ("data.embeddings.train=b.npz", EMB, True),
    ("data.embeddings.features_name=emb", EMB, True),
    ("data.embeddings.normalize=true", EMB, True),
    ("data.embeddings.class_names=[a, b]", EMB, True),  # they fix the ids of string labels
    ("data.embeddings.test_fraction=0.3", EMB, True),  # the split picks the training rows
    ("data.embeddings.test_fraction=0.3", EMB_TEST, False),  # not read with a test file
    ("data.embeddings.test=u.npz", EMB_TEST, False),  # in the cache key
    ("data.lt_seed=1", EMB, True),
    ("data.lt_seed=1", EMB_TEST, False),  # no draw
    ("data.val_per_class=5", EMB_TEST, True),
    ("data.profile=exponential", EMB, True),
    ("data.imbalance_factor=10", (*EMB, "data.profile=exponential"), True),
    ("data.crop_padding=2", EMB, False),
    ("data.flip=false", EMB, False),
    ("data.image_size=32", EMB, False),
    ("model.arch=resnet20", EMB, False),
    ("model.head=cosine", EMB, True),
    ("train.lr=0.05", EMB, True),
    ("train.loss=[{name: balanced_softmax}]", EMB, True),
    ("train.sampler.kind=class_balanced", EMB, True),
    ("train.momentum=0.8", EMB, False),  # Adam
    ("train.schedule=cosine", EMB, False),
    ("train.precision=bf16", EMB, False),  # the head trains in float32
]


@pytest.mark.parametrize("override, base, changes", STAGE1_CASES,
                         ids=[f"{o}|{','.join(b)}" for o, b, _ in STAGE1_CASES])
def test_stage1_key_hashes_exactly_the_fields_that_change_the_model(override, base, changes):
    before = load_config(None, list(base))
    after = load_config(None, [*base, override])
    assert (stage1_key(after) != stage1_key(before)) is changes


# a key of the pipeline the config does not use changes no key: it is a config error (no run has it)
UNREAD = [("data.crop_padding=2", LAYOUT), ("data.crop_scale=[0.35, 1.0]", ()),
          ("data.crop_scale=[0.35, 1.0]", (*FOLDER, "data.transforms=small")), ("data.color_jitter=0", ()),
          ("data.eval_crop_ratio=1.0", ())]


@pytest.mark.parametrize("override, base", UNREAD, ids=[f"{o}|{','.join(b)}" for o, b in UNREAD])
def test_a_key_of_the_other_pipeline_is_refused(override, base):
    with pytest.raises(ConfigError, match=f"data.{override.split('=')[0][5:]} = .*: is read by the "):
        load_config(None, [*base, override])


def test_every_field_stage1_reads_has_a_decision():
    decided = {".".join(o.split("=")[0].split(".")[:2]) for o, _, _ in STAGE1_CASES}
    fields = {f"{section}.{name}" for section, model in
              (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)) for name in model.model_fields}
    assert fields - decided == set()  # a new field must be added to STAGE1_CASES
    kept = {".".join(o.split("=")[0].split(".")[:2]) for o, _, changes in STAGE1_CASES if not changes}
    assert set(NOT_IN_STAGE1) <= kept


def keys(overrides=()):
    cfg = load_config(None, list(overrides))
    return {"stage1": stage1_key(cfg), "features": features_key(cfg), "generator": generator_key(cfg),
            "retrain": retrain_key(cfg)}


STG = "retrain.augmenter={name: stg}"
NOISE = "retrain.augmenter={name: noise}"


# (override, base, the keys that change)
LATER_CASES = [
    ("data.test_per_class=5", (), {"features", "retrain"}),
    ("data.test_split=other.txt", FOLDER, {"features", "retrain"}),
    ("data.test_split=mine.txt", PUBLISHED_SET, {"features", "retrain"}),
    ("features.views=1", (), {"features", "generator", "retrain"}),
    ("features.batch_size=64", (), set()),
    ("features.shard_rows=7", (), set()),
    ("features.dtype=float16", (), {"features", "generator", "retrain"}),  # the generator learns from the cache
    ("stg.lr=0.01", (), {"generator"}),
    ("stg.lr=0.01", (STG,), {"generator", "retrain"}),
    ("stg.lr=0.01", (NOISE,), {"generator"}),
    ("stg.head.top_k=5", (), set()),  # the many-shot rule is the default
    ("stg.head.top_k=5", ("stg.head.rule=top_k",), {"generator"}),
    ("data.shots.many=50", (), {"generator"}),
    ("data.shots.many=50", (NOISE,), {"generator", "retrain"}),
    ("data.shots.many=50", ("stg.head.rule=top_k",), set()),
    ("data.shots.few=5", (STG,), set()),
    ("run.seed=1", (), {"stage1", "features", "generator", "retrain"}),
    ("retrain.seed=0", (), set()),  # resolved: run.seed is 0
    ("retrain.seed=3", (), {"retrain"}),
    ("retrain.lr=0.01", (), {"retrain"}),
    ("retrain.lr=0.01", ("retrain.method=ncm",), set()),
    ("retrain.lr=0.01", ("retrain.method=tau_norm",), set()),
    ("retrain.tau=1.0", ("retrain.method=tau_norm",), {"retrain"}),
    ("retrain.tau=1.0", (), set()),
    ("retrain.method=lws", (), {"retrain"}),
    ("retrain.augmenter={name: dropout}", (), {"retrain"}),
    ("eval.ece_bins=10", (), set()),
    ("eval.logit_adjust_tau=1.0", (), set()),
    ("train.lr=0.05", (), {"stage1", "features", "generator", "retrain"}),
    ("data.embeddings.test=u.npz", EMB_TEST, {"features", "retrain"}),
    ("data.embeddings.test_labels=l.npy", EMB_TEST, {"features", "retrain"}),
]


@pytest.mark.parametrize("override, base, changed", LATER_CASES,
                         ids=[f"{o}|{','.join(b)}" for o, b, _ in LATER_CASES])
def test_later_keys_hash_exactly_their_fields(override, base, changed):
    before, after = keys(base), keys([*base, override])
    assert {name for name in before if before[name] != after[name]} == changed


def test_keys_name_their_stage1_model():
    k = keys()
    assert k["features"].startswith(k["stage1"] + "-") and k["generator"].startswith(k["stage1"] + "-")
    assert k["retrain"].startswith(k["features"] + "-")
    assert len(k["stage1"]) == 12 and set(k["stage1"]) <= set("0123456789abcdef")
