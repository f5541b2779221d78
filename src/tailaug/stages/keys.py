"""The key of each stored artefact: a hash of exactly the config fields that change it.

A changed field outside an artefact's list never discards that artefact; a changed field
inside it always does. Fields a setting makes inert are left out too (``train.milestones``
under a cosine schedule, ``data.profile`` for an image folder, ...).

    stage 1    backbone + classifier      stage1_key
    cache      cached features            features_key   (stage 1 + views + test split + dtype)
    maps       cached spatial maps        spatial_key    (stage 1 + dtype)
    stage 2    generator                  generator_key  (stage 1 + views + stg + head set + seed)
    stage 3    re-trained classifier      retrain_key    (cache + the fields of its method)

Decisions where a field could go either way:

- Not in the stage-1 key: where the data lives (``data.root``, ``data.download``), how
  fast it is read or scored (``data.num_workers``, ``data.prefetch_factor``,
  ``data.gpu_decode`` (the same draws; only the decoder's and resampler's rounding differ,
  as with ``run.device``), ``train.eval_batch_size``, ``train.channels_last``,
  ``run.device``), how often it is checkpointed (``train.checkpoint_every_steps``) and
  everything that only changes the report (``data.shots``, ``data.test_per_class``,
  ``data.test_split``, ``eval.*``). The test split is in the cache key instead.
- ``data.class_order`` is in the stage-1 key unless it is the identity order 0..C-1 or the
  profile is ``none`` (every class gets n_max): both give the protocol's subset, and the
  keys of runs made before the option existed stay valid.
- In the stage-1 key: the natural pipeline's ``data.crop_scale``, ``data.color_jitter`` and
  ``data.eval_crop_ratio`` (the evaluation view: the cached features depend on it), the
  validation split (it picks ``best.pt``), ``train.precision`` as written (``auto`` is not
  resolved: the key of a config is the same on every machine) and ``model.weights`` (the path of the initial weights).
- Stage 3 is keyed without ``eval.*`` and ``data.shots``: its test logits are stored and
  scored again on every run, so a new ECE bin count or shot threshold costs no training.
  With ``retrain.select`` its key holds the grid and the metric (and ``data.shots`` for the
  ``shot_mean`` metric, which ranks the points by shot group) instead of the values the grid
  replaces.
"""

from __future__ import annotations

from typing import Any

from ..config import Config, RetrainConfig, short_hash
from ..data.image_folders import HELD_OUT_TEST
from ..data.published import PUBLISHED
from ..data.natural import pipeline
from ..registry import CLASSIFIERS

# Fields of the sections stage 1 reads that never change the stage-1 model (see above).
NOT_IN_STAGE1 = (
    "data.root", "data.download", "data.num_workers", "data.prefetch_factor", "data.gpu_decode", "data.shots",
    "data.test_per_class", "data.test_split", "data.test_root", "train.eval_batch_size", "train.channels_last",
    "train.checkpoint_every_steps",
)


def _pick(section, names: tuple[str, ...]) -> dict[str, Any]:
    dumped = section.model_dump(mode="json")
    return {name: dumped[name] for name in names}


def stage1_fields(cfg: Config) -> dict[str, Any]:
    """Everything the stage-1 model (checkpoints, ``stage1.json``) depends on."""
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.dataset == "embeddings":
        return embeddings_stage1_fields(cfg)
    if pipeline(d) == "natural":  # image files (data.transforms): no padding; the crop, jitter and test view
        data = _pick(d, ("dataset", "flip", "crop_scale", "color_jitter", "eval_crop_ratio"))
        data["transforms"] = "natural"
    else:  # absent: the keys of runs made before data.transforms existed stay valid
        data = _pick(d, ("dataset", "crop_padding", "flip"))
    if d.dataset == "image_folder" and d.train_split is not None:
        data.update(_pick(d, ("train_split", "val_split", "num_classes", "image_size")))
    elif d.dataset in PUBLISHED:  # the split files (None: the published file); count_check only accepts them
        data.update(_pick(d, ("train_split", "val_split", "image_size")))
    elif d.dataset == "image_folder":  # the folder layout: the splits are drawn from data.root
        data.update(_pick(d, ("image_size", "profile", "lt_seed", "val_per_class")))
        if d.profile != "as_is":
            data.update(_pick(d, ("imbalance_factor", "n_max")))
        if d.test_root is None:  # the test images held out change the training set
            data["test_held_out"] = d.test_per_class or HELD_OUT_TEST
    else:
        data.update(_pick(d, ("profile", "imbalance_factor", "n_max", "lt_seed", "val_per_class")))
        if d.class_order not in (None, list(range(len(d.class_order or ())))) and d.profile != "none":
            data["class_order"] = d.class_order  # absent otherwise: the keys of earlier runs stay valid
    model = _pick(m, ("arch", "in_channels", "head", "weights"))
    if m.name is not None:  # absent otherwise: the keys of runs made before the options existed stay valid
        model["name"] = m.name
    if m.mode != "finetune":
        model["mode"] = m.mode
    if m.head == "cosine":
        model["cosine_scale"] = m.cosine_scale
    train = _pick(t, ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                      "warmup_epochs", "schedule", "mixup_alpha", "loss", "sampler", "precision",
                      "grad_clip"))
    train.update(_pick(t, {"multistep": ("milestones", "gamma"), "step": ("step_size", "gamma"),
                           "cosine": ("min_lr",)}[t.schedule]))
    train["reweight"] = reweight_fields(t.reweight)
    if t.remix is not None:  # absent otherwise: the keys of earlier runs stay valid
        train["remix"] = t.remix.model_dump(mode="json")
    if t.stage_module is not None:  # absent otherwise: the keys of earlier runs stay valid
        train["stage_module"] = t.stage_module.model_dump(mode="json")
    if t.feature_augmenter.name != "none":  # absent otherwise: the keys of earlier runs stay valid
        train["feature_augmenter"] = {**t.feature_augmenter.model_dump(mode="json"), "head_set": head_set_fields(cfg)}
    return {"run": {"seed": cfg.run.seed}, "data": data, "model": model, "train": train}


def reweight_fields(r) -> dict[str, Any]:
    """``train.reweight`` as it acts: the start epoch and beta only where they are read."""
    out: dict[str, Any] = {"scheme": r.scheme}
    if r.scheme != "none":
        out["start_epoch"] = r.start_epoch
    if r.scheme == "effective_number":
        out["beta"] = r.beta
    return out


def embeddings_stage1_fields(cfg: Config) -> dict[str, Any]:
    """Stage 1 on given embeddings (``stages.linear_head``): a head trained on the training
    rows. In its key: the training file and how it is read (names, class names, which fix the
    class ids, L2 normalisation), every draw that picks the training rows (the test split when
    there is no test file, the profile, the validation split, with ``data.lt_seed``), the head
    and what the Adam loop reads of ``train``. Not in it: the image keys (crop_padding, flip,
    image_size, num_workers, download), ``model.arch``/``in_channels``, the SGD settings and
    ``train.precision`` (the head trains in float32); the test file is in the cache key."""
    d, m, t = cfg.data, cfg.model, cfg.train
    e = d.embeddings
    files = _pick(e, ("train", "train_labels", "features_name", "labels_name", "class_names", "normalize"))
    if e.test is None:
        files["test_fraction"] = e.test_fraction
    data: dict[str, Any] = {"dataset": "embeddings", "embeddings": files, "profile": d.profile,
                            "val_per_class": d.val_per_class}
    if d.profile != "as_is":
        data.update(_pick(d, ("imbalance_factor", "n_max", "class_order")))
    if e.test is None or d.profile != "as_is" or d.val_per_class:
        data["lt_seed"] = d.lt_seed
    model = _pick(m, ("head",))
    if m.head == "cosine":
        model["cosine_scale"] = m.cosine_scale
    train = _pick(t, ("epochs", "batch_size", "lr", "weight_decay", "loss", "sampler"))
    train["reweight"] = reweight_fields(t.reweight)
    return {"run": {"seed": cfg.run.seed}, "data": data, "model": model, "train": train}


def stage1_key(cfg: Config) -> str:
    return short_hash(stage1_fields(cfg))


def _views_key(cfg: Config) -> dict[str, Any]:
    """The training features the generator learns from: the stage-1 model, its augmented
    views and their storage dtype (absent for float32: keys made before the option stay valid)."""
    views = {"stage1": stage1_key(cfg), "views": cfg.features.views}
    return views if cfg.features.dtype == "float32" else {**views, "dtype": cfg.features.dtype}


def features_key(cfg: Config) -> str:
    """The feature cache: the stage-1 model's training features (with ``features.views``
    augmented views) and its validation and test features, stored in ``features.dtype``.
    ``features.batch_size`` only sets the inference batch, ``features.shard_rows`` only the
    files' layout."""
    d = cfg.data
    if d.dataset in PUBLISHED:
        test = _pick(d, ("test_split",))
    elif d.dataset != "image_folder":
        test = _pick(d, ("test_per_class",))
    elif d.train_split is not None:
        test = _pick(d, ("test_split",))
    else:
        test = _pick(d, ("test_root", "test_per_class"))
    if d.dataset == "embeddings" and d.embeddings.test is not None:
        test.update(_pick(d.embeddings, ("test", "test_labels")))
    fields = {"views": cfg.features.views, "test": test}
    if cfg.features.dtype != "float32":  # absent otherwise: the keys of earlier runs stay valid
        fields["dtype"] = cfg.features.dtype
    return f"{stage1_key(cfg)}-{short_hash(fields)}"


def spatial_key(cfg: Config, dtype: str) -> str:
    """The cached spatial maps of the training images: the stage-1 model and the stored dtype."""
    return f"{stage1_key(cfg)}-{short_hash({'spatial': dtype})}"


def head_set_fields(cfg: Config) -> dict[str, Any]:
    """The fields that pick the head classes (``stg.head``; many-shot uses ``data.shots.many``)."""
    head = cfg.stg.head
    value = {"many_shot": cfg.data.shots.many, "threshold": head.threshold, "top_k": head.top_k}[head.rule]
    return {"rule": head.rule, "value": value}


def generator_key(cfg: Config) -> str:
    """The generator trains on the cached training features of the head classes; the test
    split does not reach it."""
    stg = cfg.stg.model_dump(mode="json")
    stg["head"] = head_set_fields(cfg)
    for option in ("neighbours", "rank"):  # absent at 0: keys made before the options stay valid
        if not stg[option]:
            del stg[option]
    return f"{stage1_key(cfg)}-{short_hash({**_views_key(cfg), 'stg': stg, 'seed': cfg.run.seed})}"


def retrain_seed(cfg: Config, retrain: RetrainConfig | None = None) -> int:
    """``retrain.seed``, or ``run.seed`` when it is not set."""
    seed = (retrain or cfg.retrain).seed
    return cfg.run.seed if seed is None else seed


def retrain_fields(cfg: Config, retrain: RetrainConfig) -> dict[str, Any]:
    """What the classifier of ``retrain`` (``cfg.retrain`` with its augmenter chosen) depends
    on besides the cache: the options its registration ``reads`` (e.g. ``ncm`` none,
    ``tau_norm`` ``retrain.tau``, the validation split being in the stage-1 key; ``crt``/``lws``
    their training settings and the resolved seed) and, with an augmenter, the head set (and
    the generator when the augmenter uses it)."""
    reads = CLASSIFIERS.get(retrain.method).reads
    fields: dict[str, Any] = {"method": retrain.method,
                              **_pick(retrain, tuple(r for r in reads if r not in ("seed", "loss")))}
    if "loss" in reads and not retrain.plain_loss():  # absent: keys made before the option stay valid
        fields["loss"] = [term.model_dump(mode="json") for term in retrain.loss]
    if "seed" in reads:
        fields["seed"] = retrain_seed(cfg, retrain)
    if "lr" in reads and retrain.schedule != "constant":  # absent: keys made before the option stay valid
        fields["schedule"] = retrain.schedule
    if "augmenter" in reads and retrain.augmenter.name != "none":
        fields["head_set"] = head_set_fields(cfg)
        if retrain.augmenter.uses_generator:
            fields["generator"] = generator_key(cfg)
    if retrain.select is not None:
        fields["select"] = select_fields(cfg, retrain)
        for key in retrain.select.grid:  # its own value is replaced by each point of the grid
            *parents, last = key.split(".")
            node = fields
            for part in parents:
                node = node.get(part, {})
            node.pop(last, None)
    return fields


def select_fields(cfg: Config, retrain: RetrainConfig) -> dict[str, Any]:
    """What a choice on the validation split depends on besides the points' options: the
    grid itself (not the chosen values alone), the metric and, for ``shot_mean``, the shot
    groups. The validation split is in the stage-1 key."""
    select = retrain.select
    fields: dict[str, Any] = {"grid": select.grid, "metric": select.metric}
    if select.metric == "shot_mean":
        fields["shots"] = cfg.data.shots.model_dump()
    return fields


def retrain_key(cfg: Config, retrain: RetrainConfig | None = None) -> str:
    return f"{features_key(cfg)}-{short_hash(retrain_fields(cfg, retrain or cfg.retrain))}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        out.update(_flatten(value, path + ".") if isinstance(value, dict) else {path: value})
    return out


def changed_fields(a: Config, b: Config) -> list[str]:
    """The stage-1 fields (dotted, as in :func:`stage1_fields`) whose values differ."""
    fa, fb = _flatten(stage1_fields(a)), _flatten(stage1_fields(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, ...) != fb.get(k, ...))
