"""tailaug.LongTailClassifier (scikit-learn) and tailaug.FeatureAugmentSampler (imbalanced-learn)."""

import warnings

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

import tailaug
from tailaug.estimators import FeatureAugmentSampler, LongTailClassifier

from synthetic import long_tail_embeddings

# Short trainings for the checks (a few hundred rows each); every check runs, none is skipped
# by us. scikit-learn itself skips check_array_api_input (SCIPY_ARRAY_API unset) and, without
# pandas, check_classifier_data_not_an_array's DataFrame part: both concern input types other
# than numpy arrays, which validate_data converts like any other.
FAST = dict(epochs=30, lr=0.05, retrain_epochs=30, retrain_lr=0.05, random_state=0)


@parametrize_with_checks([LongTailClassifier(**FAST), LongTailClassifier(method="lws", augmenter="noise", **FAST)])
def test_sklearn_estimator_checks(estimator, check, one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)


def data(seed=0):
    x, y, xt, yt = long_tail_embeddings([120, 50, 20, 8], dim=6, spread=2.5, seed=seed, test_per_class=40)
    return x, y, xt, yt


def test_import_is_lazy_and_the_names_are_exported():
    assert tailaug.LongTailClassifier is LongTailClassifier and tailaug.FeatureAugmentSampler is FeatureAugmentSampler
    with pytest.raises(AttributeError):
        tailaug.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("params", [
    {}, {"method": "none"}, {"method": "lws"}, {"method": "ncm"}, {"method": "tau_norm"},
    {"augmenter": "noise", "many": 40}, {"augmenter": {"name": "stg", "lam": 1.0}, "many": 40,
                                         "stg": {"epochs": 5, "memory_size": 64}},
    {"method": "none", "loss": "ldam", "head": "cosine"}, {"method": "none", "loss": ["ce", "focal"],
                                                           "reweight": "inverse_frequency"},
])
def test_every_method_beats_chance_on_string_labels(params, one_thread):
    x, y, xt, yt = data()
    names = np.array(["ant", "bee", "cat", "dog"])
    model = LongTailClassifier(random_state=0, **params).fit(x, names[y])
    assert model.classes_.tolist() == names.tolist()
    proba = model.predict_proba(xt)
    assert proba.shape == (len(yt), 4) and np.allclose(proba.sum(1), 1)
    assert model.score(xt, names[yt]) > 0.8  # chance: 0.25
    assert set(model.predict(xt)) <= set(names)


def test_the_same_random_state_gives_the_same_model(one_thread):
    x, y, xt, _ = data()
    a = LongTailClassifier(augmenter="noise", many=40, random_state=3, **{k: v for k, v in FAST.items()
                                                                         if k != "random_state"})
    p1 = a.fit(x, y).predict_proba(xt)
    p2 = LongTailClassifier(**a.get_params()).fit(x, y).predict_proba(xt)
    assert np.array_equal(p1, p2)


BAD_PARAMS = [
    ({"method": "svm"}, "method='svm' is not allowed; use one of crt, lws, ncm, tau_norm, none"),
    ({"augmenter": "warp"}, "augmenter='warp' is not allowed; unknown augmenter 'warp'"),
    ({"augmenter": {"name": "stg", "lam": -1}}, r"augmenter=\{'name': 'stg', 'lam': -1\} is not allowed \(lam: Input "
                                                "should be greater than or equal to 0\\)"),
    ({"loss": "balanced"}, "loss='balanced' is not allowed .*unknown loss 'balanced'.*did you mean 'balanced_softmax'"),
    ({"lr": 0}, r"lr=0 is not allowed \(Input should be greater than 0\)"),
    ({"retrain_epochs": 0}, r"retrain_epochs=0 is not allowed \(Input should be greater than or equal to 1\)"),
    ({"sampler": "random"}, "sampler='random' is not allowed .*unknown sampler 'random'"),
    ({"stg": {"epochs": 0}}, r"stg=\{'epochs': 0\} is not allowed \(epochs: Input should be greater"),
    ({"head": "mlp"}, "head='mlp' is not allowed; use 'linear' or 'cosine'"),
    ({"method": "none", "augmenter": "noise"}, "augmenter='noise' needs a stage-3 classifier"),
    ({"method": "tau_norm", "head": "cosine"}, "method='tau_norm' with head='cosine' is not allowed"),
    ({"epochs": True}, "epochs=True is not allowed"),
]


@pytest.mark.parametrize("params, message", BAD_PARAMS)
def test_a_bad_parameter_is_a_value_error_naming_parameter_value_and_choices(params, message):
    x, y, _, _ = data()
    model = LongTailClassifier(**params)
    assert model.get_params()[next(iter(params))] == params[next(iter(params))]  # stored as given
    with pytest.raises(ValueError, match=f"^LongTailClassifier: {message}"):
        model.fit(x, y)


def test_pipeline_cross_val_score_and_grid_search(one_thread):
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, xt, yt = data()
    pipe = make_pipeline(StandardScaler(), LongTailClassifier(**FAST))
    assert pipe.fit(x, y).score(xt, yt) > 0.8
    scores = cross_val_score(pipe, x, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.7
    grid = GridSearchCV(LongTailClassifier(**FAST), {"method": ["crt", "ncm"], "normalize": [False, True]}, cv=2)
    grid.fit(x, y)
    assert grid.best_params_["method"] in ("crt", "ncm") and grid.score(xt, yt) > 0.8
    assert len(grid.cv_results_["params"]) == 4


@pytest.mark.parametrize("augmenter", ["noise", "dropout", {"name": "stg", "lam": 1.0}])
def test_the_sampler_adds_augmented_rows_up_to_the_largest_class(augmenter, one_thread):
    x, y, _, _ = data()
    sampler = FeatureAugmentSampler(augmenter=augmenter, many=40, stg={"epochs": 3, "memory_size": 64}, random_state=0)
    xr, yr = sampler.fit_resample(x, y)
    assert np.array_equal(xr[: len(x)], x) and np.array_equal(yr[: len(y)], y)  # the originals first, unchanged
    assert np.bincount(yr).tolist() == [120] * 4
    new = xr[len(x):]
    assert np.isfinite(new).all() and not any((new == row).all(1).any() for row in x[:50])  # augmented, not copied
    again = FeatureAugmentSampler(augmenter=augmenter, many=40, stg={"epochs": 3, "memory_size": 64},
                                  random_state=0).fit_resample(x, y)
    assert np.array_equal(again[0], xr)


def test_the_sampler_follows_sampling_strategy_and_keeps_string_labels():
    x, y, _, _ = data()
    names = np.array(["a", "b", "c", "d"])[y]
    xr, yr = FeatureAugmentSampler(sampling_strategy={"d": 30}, random_state=0).fit_resample(x, names)
    assert len(xr) == len(x) + 22 and (yr[len(x):] == "d").all()


def test_stg_sampler_without_a_head_class_says_how_to_get_one():
    x, y, _, _ = data()
    with pytest.raises(ValueError, match=r"the STG generator cannot be trained on this data .*many=500"):
        FeatureAugmentSampler(augmenter="stg", many=500, random_state=0).fit_resample(x, y)


def test_the_sampler_in_an_imblearn_pipeline_before_a_sklearn_classifier(one_thread):
    from imblearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression

    x, y, xt, yt = data()
    pipe = make_pipeline(FeatureAugmentSampler(augmenter="noise", random_state=0), LogisticRegression(max_iter=500))
    pipe.fit(x, y)
    assert pipe.score(xt, yt) > 0.8
    assert np.bincount(pipe.predict(xt), minlength=4)[3] > 0  # the tail class is predicted
