"""tailaug on feature matrices, the scikit-learn way: an estimator and an imbalanced-learn sampler.

- :class:`LongTailClassifier`: stage 1 (a linear head trained with a re-balancing loss,
  :func:`tailaug.stages.linear_head.train_linear_head`), stage 2 (the STG, when the augmenter
  uses it, :func:`tailaug.stages.generator.train_generator`) and stage 3 (a decoupled
  classifier with a feature augmenter, :func:`tailaug.stages.classifier.retrain_classifier`),
  the same code as ``tailaug run`` on ``data.dataset: embeddings``.
- :class:`FeatureAugmentSampler`: a feature augmenter as an imbalanced-learn over-sampler:
  ``fit_resample(X, y)`` returns the rows of X plus augmented copies of rows of the classes
  ``sampling_strategy`` names (STG: its generator trained on the head classes of X first).

Parameters are stored as given and checked in ``fit``: a bad one is a ValueError naming the
parameter, the value and what is allowed. Everything random comes from ``random_state``.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
import torch
from imblearn.over_sampling.base import BaseOverSampler
from pydantic import ValidationError
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .augment.base import AugmentContext, build_augmenter
from .augment.stg import head_classes
from .config import RetrainConfig, STGConfig, TrainConfig
from .errors import TailaugError
from .registry import AUGMENTERS, CLASSIFIERS

STAGE1_ONLY = "none"  # method: the stage-1 head itself, no stage 3


def _section(model, tree: dict, owner: str, params: dict, whole: tuple | None = None):
    """``model`` validated from ``tree``; a ValueError naming the estimator parameter otherwise.
    ``params`` maps a key of ``tree`` to (parameter name, the value the user gave); ``whole`` =
    (name, value) when ``tree`` is one parameter's mapping (``stg``)."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "strict_scalar":
            loc = [*loc, err["ctx"]["field"]]
        if whole is not None:
            (param, value), where = whole, ".".join(loc)
        else:
            param, value = params.get(loc[0] if loc else "", (loc[0] if loc else "?", err.get("input")))
            where = ".".join(loc[1:])
        msg = err["msg"].removeprefix("Value error, ")
        raise ValueError(f"{owner}: {param}={value!r} is not allowed ({where + ': ' if where else ''}{msg})") from None
    except TailaugError as exc:
        raise ValueError(f"{owner}: {exc}") from None


def _named(value):
    """A method-valued parameter (a name, or a mapping with a name) as a config mapping."""
    return {"name": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else value


def _losses(value):
    return [_named(v) for v in value] if isinstance(value, (list, tuple)) else [_named(value)]


def _seed(random_state) -> int:
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return int(random_state)
    return int(check_random_state(random_state).randint(2**31 - 1))


def _augmenter_config(augmenter, owner: str, targets_all: bool = False):
    tree = _named(augmenter)
    if not isinstance(tree, dict):
        raise ValueError(f"{owner}: augmenter={augmenter!r} is not allowed; give a name ({', '.join(AUGMENTERS.names())}) "
                         "or a mapping of options such as {'name': 'stg', 'lam': 1.0}")
    entry_name = tree.get("name")
    if entry_name not in AUGMENTERS:
        raise ValueError(f"{owner}: augmenter={augmenter!r} is not allowed; {AUGMENTERS.unknown(entry_name)}")
    model = AUGMENTERS.get(entry_name).config
    if targets_all and "targets" in model.model_fields and "targets" not in tree:
        tree["targets"] = "all"  # a sampler augments every class it over-samples
    return _section(RetrainConfig, {"augmenter": tree}, owner, {"augmenter": ("augmenter", augmenter)}).augmenter


def _generator(aug_cfg, stg, x, y, counts, *, many: int, seed: int, device, owner: str):
    """The STG trained on the head classes of (x, y) when the augmenter uses one, else None."""
    if stg is not None and not isinstance(stg, dict):
        raise ValueError(f"{owner}: stg={stg!r} is not allowed; give None or a mapping of STG options, e.g. "
                         "{'epochs': 20, 'head': {'rule': 'top_k', 'top_k': 3}}")
    stg_cfg = _section(STGConfig, dict(stg or {}), owner, {}, whole=("stg", stg))
    if not aug_cfg.uses_generator:
        return None, stg_cfg
    from .stages.generator import train_generator

    try:
        model, _ = train_generator(x, y, None, counts, stg_cfg, seed=seed, many=many, progress=False, device=device)
    except TailaugError as exc:
        raise ValueError(f"{owner}: the STG generator cannot be trained on this data ({exc}); the head classes come "
                         f"from many={many} (classes with more samples) or stg={{'head': {{'rule': 'top_k', "
                         "'top_k': K}}}") from None
    return model, stg_cfg


class LongTailClassifier(ClassifierMixin, BaseEstimator):
    """A long-tail classifier on feature vectors (e.g. embeddings of a pretrained model).

    Parameters
    ----------
    method : ``"crt"`` (default), ``"lws"``, ``"tau_norm"``, ``"ncm"`` or ``"none"``: the
        decoupled classifier of stage 3 (``"none"``: the stage-1 head trained with ``loss``).
    augmenter : ``"none"`` (default), ``"stg"``, ``"noise"``, ``"dropout"``, or a mapping of
        its options (``{"name": "stg", "lam": 1.0}``): the feature augmenter of stage 3.
    loss : the stage-1 loss, a name, a mapping of options or a list of them (default
        ``"balanced_softmax"``; read when stage 1 is trained: method none, lws, tau_norm, or
        an augmenter with ``token: classifier``).
    head : ``"linear"`` or ``"cosine"`` (margin losses such as ldam need cosine).
    epochs, lr, batch_size, weight_decay, sampler, reweight : stage 1 (Adam; ``sampler`` a
        sampler kind, ``reweight`` a scheme: none, inverse_frequency, effective_number).
    retrain_epochs, retrain_lr, retrain_sampler : stage 3 (Adam, class-balanced by default).
    stg : options of the STG generator (``tailaug.config.STGConfig``), e.g.
        ``{"epochs": 20, "head": {"rule": "top_k", "top_k": 3}}``.
    many : classes with more samples than this are the head classes (STG, augmenters).
    normalize : L2-normalise every row of X (in fit and predict).
    device : ``"cpu"`` or ``"cuda"``.
    random_state : int, RandomState or None, the seed of every draw.
    """

    def __init__(self, method="crt", augmenter="none", loss="balanced_softmax", *, head="linear", epochs=100,
                 lr=0.01, batch_size=256, weight_decay=0.0, sampler="instance", reweight="none", retrain_epochs=100,
                 retrain_lr=0.01, retrain_sampler="class_balanced", stg=None, many=100, normalize=False,
                 device="cpu", random_state=None):
        self.method = method
        self.augmenter = augmenter
        self.loss = loss
        self.head = head
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.sampler = sampler
        self.reweight = reweight
        self.retrain_epochs = retrain_epochs
        self.retrain_lr = retrain_lr
        self.retrain_sampler = retrain_sampler
        self.stg = stg
        self.many = many
        self.normalize = normalize
        self.device = device
        self.random_state = random_state

    # ------------------------------------------------------------------ checks

    def _check_params(self):
        owner = type(self).__name__
        methods = [*CLASSIFIERS.names(), STAGE1_ONLY]
        if self.method not in methods:
            raise ValueError(f"{owner}: method={self.method!r} is not allowed; use one of {', '.join(methods)}")
        if self.head not in ("linear", "cosine"):
            raise ValueError(f"{owner}: head={self.head!r} is not allowed; use 'linear' or 'cosine'")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"{owner}: device={self.device!r} is not allowed; use 'cpu' or 'cuda'")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"{owner}: normalize={self.normalize!r} is not allowed; use True or False")
        if isinstance(self.many, bool) or not isinstance(self.many, (int, np.integer)) or self.many < 0:
            raise ValueError(f"{owner}: many={self.many!r} is not allowed; give a whole number >= 0")
        p = {name: (name, getattr(self, name)) for name in ("epochs", "lr", "batch_size", "weight_decay", "loss",
                                                             "sampler", "reweight")}
        train = _section(TrainConfig, {
            "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "weight_decay": self.weight_decay,
            "loss": _losses(self.loss), "sampler": {"kind": self.sampler}, "reweight": {"scheme": self.reweight},
        }, owner, p)
        augmenter = _augmenter_config(self.augmenter, owner)
        retrain = _section(RetrainConfig, {
            "method": "crt" if self.method == STAGE1_ONLY else self.method, "epochs": self.retrain_epochs,
            "lr": self.retrain_lr, "batch_size": self.batch_size, "sampler": {"kind": self.retrain_sampler},
            "augmenter": augmenter.model_dump(), "weight_decay": self.weight_decay,
        }, owner, {**p, "method": ("method", self.method), "epochs": ("retrain_epochs", self.retrain_epochs),
                   "lr": ("retrain_lr", self.retrain_lr), "sampler": ("retrain_sampler", self.retrain_sampler),
                   "augmenter": ("augmenter", self.augmenter)})
        if self.method == "tau_norm" and self.head == "cosine":
            raise ValueError(f"{owner}: method='tau_norm' with head='cosine' is not allowed: a cosine head normalises "
                             "its weights, so every tau gives back the stage-1 head; use head='linear' or method 'lws'")
        if self.method == STAGE1_ONLY and augmenter.name != "none":
            raise ValueError(f"{owner}: augmenter={self.augmenter!r} needs a stage-3 classifier, and method='none' "
                             "has none; use method='crt' (or augmenter='none')")
        return train, retrain

    # ------------------------------------------------------------------ fit / predict

    def fit(self, X, y):
        train, retrain = self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes in y, and y has 1 class "
                             f"({self.classes_[0]!r})")
        x = torch.tensor(self._rows(X, np.float32))
        labels = torch.as_tensor(y_enc, dtype=torch.long)
        counts = np.bincount(y_enc, minlength=len(self.classes_)).tolist()
        seed = _seed(self.random_state)
        device = torch.device(self.device)
        owner = type(self).__name__
        aug = retrain.augmenter
        try:
            stage1 = None
            if self.method in (STAGE1_ONLY, "lws", "tau_norm") or getattr(aug, "token", None) == "classifier":
                from .stages.linear_head import train_linear_head

                stage1 = train_linear_head(x, labels, counts, train, head=self.head, seed=seed, device=device)
            if self.method == STAGE1_ONLY:
                model = stage1
            else:
                from .stages.classifier import retrain_classifier

                generator, stg = _generator(aug, self.stg, x, labels, counts, many=self.many, seed=seed,
                                            device=device, owner=owner)
                weight = None if stage1 is None else stage1.weight.detach()
                bias = None if stage1 is None else getattr(stage1, "bias", None)
                scale = stage1.scale if stage1 is not None and self.head == "cosine" else None
                model = retrain_classifier(
                    x, labels, counts, retrain, num_classes=len(counts), seed=seed,
                    augmenter=build_augmenter(aug, generator_module=generator), init_weight=weight,
                    init_bias=None if bias is None else bias.detach(), init_cosine_scale=scale, progress=False,
                    device=device, head_classes=head_classes(counts, stg.head, many=self.many),
                )
        except TailaugError as exc:
            raise ValueError(f"{owner}: {exc}") from None
        # predictions in float64: a row's probabilities do not depend on the batch it comes in
        self.model_ = model.double().eval()
        self.class_counts_ = np.asarray(counts)
        return self

    def _rows(self, X, dtype) -> np.ndarray:
        X = np.array(X, dtype=dtype)  # a copy: torch refuses read-only memory
        if self.normalize:
            X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X

    def _logits(self, X) -> torch.Tensor:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        x = torch.tensor(self._rows(X, np.float64), dtype=torch.float64, device=torch.device(self.device))
        with torch.no_grad():
            return self.model_(x).double().cpu()

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(self._logits(X), dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        best = self._logits(X).argmax(1).numpy()
        return self.classes_[best]


class FeatureAugmentSampler(BaseOverSampler):
    """A tailaug feature augmenter as an imbalanced-learn over-sampler.

    ``fit_resample(X, y)`` returns every row of X followed by synthesised rows: for each class
    ``sampling_strategy`` over-samples (imbalanced-learn's meaning; ``"auto"``: every class but
    the largest, up to the largest), rows of that class drawn at random and augmented
    (``augmenter``: ``"noise"`` by default, ``"dropout"``, ``"stg"``, or a mapping of options;
    the augmenter treats every class it over-samples, ``targets: all``). STG first trains its
    generator on the head classes of X (more than ``many`` samples, or ``stg["head"]``); rows of
    other classes borrow the token of their most similar head class.
    """

    _parameter_constraints: dict = {
        **BaseOverSampler._parameter_constraints,
        "augmenter": [str, dict],
        "stg": [dict, None],
        "many": [Integral],
        "random_state": ["random_state"],
    }

    def __init__(self, *, augmenter="noise", sampling_strategy="auto", stg=None, many=100, random_state=None):
        super().__init__(sampling_strategy=sampling_strategy)
        self.augmenter = augmenter
        self.stg = stg
        self.many = many
        self.random_state = random_state

    def _fit_resample(self, X, y):
        owner = type(self).__name__
        aug_cfg = _augmenter_config(self.augmenter, owner, targets_all=True)
        if aug_cfg.implicit:
            raise ValueError(f"{owner}: augmenter={self.augmenter!r} augments implicitly, in the classifier's loss, "
                             "and produces no rows to over-sample with; use it as LongTailClassifier(augmenter=...) "
                             "or choose noise, dropout or stg")
        classes, y_enc = np.unique(y, return_inverse=True)
        x = torch.tensor(np.asarray(X, dtype=np.float32))
        labels = torch.as_tensor(y_enc, dtype=torch.long)
        counts = np.bincount(y_enc, minlength=len(classes)).tolist()
        seed = _seed(self.random_state)
        generator, stg = _generator(aug_cfg, self.stg, x, labels, counts, many=self.many, seed=seed,
                                    device=torch.device("cpu"), owner=owner)
        augmenter = build_augmenter(aug_cfg, generator_module=generator)
        try:
            augmenter.fit(AugmentContext(features=x, labels=labels, class_counts=torch.tensor(counts),
                                         head_classes=head_classes(counts, stg.head, many=self.many),
                                         num_classes=len(classes)))
        except TailaugError as exc:
            raise ValueError(f"{owner}: {exc}") from None
        rng = np.random.RandomState(seed)
        draws = torch.Generator().manual_seed(seed)
        new_x, new_y = [np.asarray(X)], [np.asarray(y)]
        for label, n in self.sampling_strategy_.items():
            if n <= 0:
                continue
            c = int(np.searchsorted(classes, label))
            rows = rng.choice(np.flatnonzero(y_enc == c), size=n, replace=True)
            with torch.no_grad():
                out, _ = augmenter(x[rows], labels[rows], generator=draws)
            new_x.append(out.numpy().astype(np.asarray(X).dtype, copy=False))
            new_y.append(np.asarray(y)[rows])
        return np.vstack(new_x), np.concatenate(new_y)
