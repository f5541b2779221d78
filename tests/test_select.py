"""retrain.select: stage-3 options chosen on the validation split, never on the test set."""

import json
import math

import pytest
import torch

from tailaug.augment.base import NoAugmenter
from tailaug.config import load_config
from tailaug.errors import ConfigError, TailaugError
from tailaug.evaluation.scoring import validation_score
from tailaug.stages import pipeline
from tailaug.stages.feature_cache import legacy_cache_path
from tailaug.stages.keys import retrain_key
from tailaug.stages.select import row_label, row_select, select_on_validation

VAL = "data.val_per_class=5"
LR_GRID = "retrain.select={grid: {lr: [0.1, 0.001, 0.00001], epochs: [1, 4]}}"


def error_of(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return str(info.value).splitlines()[1].strip()


# --------------------------------------------------------------------------- the config


def test_grid_is_read_with_dotted_or_nested_keys_and_validated_values():
    cfg = load_config(None, [VAL, "retrain.augmenter={name: stg}",
                             "retrain.select={grid: {augmenter: {lam: [0.5, 1]}, lr: [1e-3, 0.0003]}}"])
    select = cfg.retrain.select
    assert select.grid == {"augmenter.lam": [0.5, 1.0], "lr": [0.001, 0.0003]}  # "1e-3" is YAML 1.1's string
    assert select.metric == "top1"
    assert select.points() == [{"augmenter.lam": 0.5, "lr": 0.001}, {"augmenter.lam": 0.5, "lr": 0.0003},
                               {"augmenter.lam": 1.0, "lr": 0.001}, {"augmenter.lam": 1.0, "lr": 0.0003}]
    point = cfg.retrain.at(select.points()[1])
    assert (point.augmenter.lam, point.lr, point.select) == (0.5, 0.0003, None)
    assert point.augmenter.t == cfg.retrain.augmenter.t and point.epochs == cfg.retrain.epochs
    again = load_config(None, [VAL, "retrain.augmenter={name: stg}", "retrain.select.grid.lr=[0.001, 0.01]"])
    assert again.retrain.select.grid == {"lr": [0.001, 0.01]}


def test_select_round_trips_through_the_saved_config(tmp_path):
    cfg = load_config(None, [VAL, "retrain.select={grid: {lr: [1e-3, 0.01]}, metric: shot_mean}"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("overrides, message", [
    (["retrain.select={grid: {lr: [0.001]}}"],
     "retrain.select chooses stage-3 options on the validation split (never on the test set), and this config "
     "has none: set data.val_per_class (e.g. 20: a balanced split held out of the training images)"),
    ([VAL, "retrain.select={grid: {lrr: [0.001]}}"],
     "retrain.select.grid point {lrr: 0.001}: unknown key 'retrain.lrr': did you mean 'retrain.lr'?"),
    ([VAL, "retrain.augmenter={name: stg}", "retrain.select={grid: {augmenter.lamm: [0.5]}}"],
     "retrain.select.grid point {augmenter.lamm: 0.5}: unknown key 'retrain.augmenter.lamm': did you mean "
     "'retrain.augmenter.lam'?"),
    ([VAL, "retrain.select={grid: {augmenter.lam: [0.5]}}"],  # the augmenter is none
     "retrain.select.grid varies augmenter.lam, but retrain.augmenter is none: set the augmenter whose option "
     "it chooses (e.g. retrain.augmenter={name: stg})"),
    ([VAL, "retrain.select={grid: {lr: [0.1, -1]}}"],
     "retrain.select.grid point {lr: -1}: retrain.lr = -1: Input should be greater than 0"),
    ([VAL, "retrain.select={grid: {epochs: [true]}}"],
     "retrain.select.grid point {epochs: true}: retrain.epochs = True: expected a number, not the boolean true"),
    ([VAL, "retrain.select={grid: {sampler.kind: [sqrt, bogus]}}"],
     "retrain.select.grid point {sampler.kind: bogus}: retrain.sampler.kind = 'bogus': unknown sampler 'bogus' "
     "(sampler.kind); available: class_balanced, instance, progressive, sqrt"),
    ([VAL, "retrain.select={grid: {lr: [0.001, 1e-3]}}"],
     "retrain.select.grid lists lr = 0.001 more than once; give each value once"),
    ([VAL, "retrain.select={grid: {lr: []}}"], "retrain.select.grid: lr has no values: give at least one"),
    ([VAL, "retrain.select={grid: {}}"],
     "retrain.select.grid: names no option to choose; give at least one, e.g. {lr: [0.001, 0.0003]}"),
    ([VAL, "retrain.select={grid: {lr: 0.1}}"], "retrain.select.grid.lr = 0.1: Input should be a valid list"),
    ([VAL, "retrain.select={grid: {retrain.lr: [0.1]}}"],
     "retrain.select.grid: retrain.lr is not relative to retrain: write 'lr'"),
    ([VAL, "retrain.select={grid: {seed: [1, 2]}}"],
     "retrain.select.grid: seed cannot be chosen: a seed chosen on validation is a lucky draw, not a setting; "
     "set retrain.seed"),
    ([VAL, "retrain.select={grid: {method: [crt, lws]}}"],
     "retrain.select.grid: method cannot be chosen: the grid chooses the options of one retrain.method; compare "
     "methods as rows"),
    ([VAL, "retrain.select={grid: {augmenter: [{name: noise}]}}"],
     "retrain.select.grid: augmenter cannot be chosen: the grid varies the options of retrain.augmenter "
     "(augmenter.lam, ...); compare augmenters as rows"),
    ([VAL, "retrain.select={grid: {tau: [1.0]}}"],
     "retrain.select.grid varies tau, which retrain.method crt does not read, so every point would give the "
     "same classifier; it reads epochs, batch_size, lr, weight_decay, sampler, augmenter, loss"),
    ([VAL, "retrain.method=ncm", "retrain.select={grid: {lr: [0.1]}}"],
     "retrain.select.grid varies lr, which retrain.method ncm does not read, so every point would give the "
     "same classifier; it has no option to choose: remove retrain.select"),
    ([VAL, "retrain.select={grid: {lr: [0.1]}, metric: top5}"],
     "retrain.select.metric = 'top5': Input should be 'top1', 'balanced', 'shot_mean' or 'nll'"),
])
def test_a_bad_select_is_a_config_error_before_anything_trains(overrides, message):
    assert error_of(overrides) == message


def test_an_image_folder_selects_on_its_validation_split_file():
    folder = ["data.dataset=image_folder", "data.root=/data", "data.train_split=train.txt",
              "data.test_split=test.txt", "retrain.select={grid: {lr: [0.1]}}"]
    assert "set data.val_split (a split file of validation images)" in error_of(folder)
    assert load_config(None, [*folder, "data.val_split=val.txt"]).retrain.select.grid == {"lr": [0.1]}


# --------------------------------------------------------------------------- rows, labels and keys


def test_each_row_searches_the_grid_keys_it_reads_and_is_named_by_them():
    cfg = load_config(None, [VAL, "retrain.augmenter={name: stg, lam: 1.5}",
                             "retrain.select={grid: {augmenter.lam: [0.5, 1.5], lr: [0.001, 0.01]}}"])
    plain = row_select(cfg.retrain, NoAugmenter())
    assert plain.grid == {"lr": [0.001, 0.01]}
    assert row_select(cfg.retrain, cfg.retrain.augmenter).grid == cfg.retrain.select.grid
    assert row_label(cfg.retrain) == "cRT + STG [augmenter.lam, lr chosen on validation top1]"
    assert row_label(cfg.retrain.model_copy(update={"augmenter": NoAugmenter(), "select": plain})) == \
        "cRT [lr chosen on validation top1]"
    lam_only = load_config(None, [VAL, "retrain.augmenter={name: stg, lam: 1.5}",
                                  "retrain.select={grid: {augmenter.lam: [0.5, 1.5]}, metric: shot_mean}"])
    assert row_select(lam_only.retrain, NoAugmenter()) is None  # the plain row is trained as given
    lr_only = load_config(None, [VAL, "retrain.augmenter={name: stg, lam: 1.5}",
                                 "retrain.select={grid: {lr: [0.001]}, metric: shot_mean}"])
    assert row_label(lr_only.retrain) == "cRT + STG (lambda 1.5) [lr chosen on validation shot_mean]"
    assert row_label(load_config(None, ["retrain.augmenter={name: stg, lam: 1.5}"]).retrain) == "cRT + STG (lambda 1.5)"


# (override, base, does the stage-3 key change?)
KEY_CASES = [
    ("retrain.select={grid: {lr: [0.001, 0.01]}}", (VAL,), True),
    ("retrain.select={grid: {lr: [0.001, 0.03]}}", (VAL, "retrain.select={grid: {lr: [0.001, 0.01]}}"), True),
    ("retrain.select={grid: {lr: [0.01, 0.001]}}", (VAL, "retrain.select={grid: {lr: [0.001, 0.01]}}"), True),
    ("retrain.select.metric=balanced", (VAL, "retrain.select={grid: {lr: [0.001, 0.01]}}"), True),
    ("retrain.select={grid: {lr: [1e-3, 0.01]}}", (VAL, "retrain.select={grid: {lr: [0.001, 0.01]}}"), False),
    ("retrain.lr=0.5", (VAL, "retrain.select={grid: {lr: [0.001, 0.01]}}"), False),  # replaced by the grid
    ("retrain.epochs=3", (VAL, "retrain.select={grid: {lr: [0.001, 0.01]}}"), True),
    ("data.shots.many=50", (VAL, "retrain.select={grid: {lr: [0.001]}, metric: shot_mean}"), True),
    ("data.shots.many=50", (VAL, "retrain.select={grid: {lr: [0.001]}}"), False),
    ("eval.ece_bins=5", (VAL, "retrain.select={grid: {lr: [0.001]}, metric: shot_mean}"), False),
]


@pytest.mark.parametrize("override, base, changes", KEY_CASES, ids=[f"{o}|{','.join(b)}" for o, b, _ in KEY_CASES])
def test_the_stage3_key_holds_the_grid_not_the_values_it_replaces(override, base, changes):
    before, after = load_config(None, list(base)), load_config(None, [*base, override])
    assert (retrain_key(after) != retrain_key(before)) is changes


def test_the_key_of_an_augmenter_grid_leaves_out_the_replaced_option():
    base = [VAL, "retrain.augmenter={name: noise, std: 0.5}", "retrain.select={grid: {augmenter.std: [0.1, 1.0]}}"]
    assert retrain_key(load_config(None, base)) == retrain_key(load_config(None, [*base, "retrain.augmenter.std=1.5"]))
    assert retrain_key(load_config(None, base)) != retrain_key(load_config(None, [*base, "retrain.augmenter.targets=all"]))


# --------------------------------------------------------------------------- the metric


def test_validation_score_of_each_metric_by_hand():
    # classes 0..3 with 200, 150, 50, 10 training images: many {0, 1}, medium {2}, few {3}
    counts = [200, 150, 50, 10]
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    preds = torch.tensor([0, 0, 0, 0, 2, 3, 2, 0, 3, 3])  # per class 4/4, 0/2, 1/2, 2/2
    logits = torch.nn.functional.one_hot(preds, 4).float()
    score = lambda metric: validation_score(logits, labels, counts, metric, many=100, few=20)  # noqa: E731
    assert score("top1") == pytest.approx(100 * 7 / 10)
    assert score("balanced") == pytest.approx((100 + 0 + 50 + 100) / 4)
    assert score("shot_mean") == pytest.approx(((100 + 0) / 2 + 50 + 100) / 3)
    # one-hot logits: the true class has probability e / (e + 3) when predicted, 1 / (e + 3) if not
    e = math.e
    assert score("nll") == pytest.approx((7 * -math.log(e / (e + 3)) + 3 * -math.log(1 / (e + 3))) / 10)


# --------------------------------------------------------------------------- the choice


class Fixed(torch.nn.Module):
    """A 'classifier' whose predictions were fixed in advance."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)
        self.choices = {"seed": 0}

    def forward(self, x):
        return self.logits[: len(x)]


def test_the_first_of_tied_points_is_chosen_and_every_score_recorded():
    cfg = load_config(None, [VAL, "retrain.select={grid: {lr: [0.1, 0.01, 0.001], epochs: [1, 2]}}"])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    right = torch.nn.functional.one_hot(labels, 3).float()
    wrong = torch.nn.functional.one_hot(torch.zeros(6, dtype=torch.long), 3).float()
    # lr 0.01 with either epochs predicts every validation image right, the rest only class 0
    fit = lambda point: Fixed(right if point.lr == 0.01 else wrong)  # noqa: E731
    best = select_on_validation(fit, cfg.retrain, torch.zeros(6, 4), labels, [10, 10, 10], cfg.data.shots)
    select = best.choices["select"]
    assert [s["score"] for s in select["scores"]] == pytest.approx([100 / 3, 100 / 3, 100, 100, 100 / 3, 100 / 3])
    assert [s["point"] for s in select["scores"]] == cfg.retrain.select.points()
    assert select["chosen"] == {"lr": 0.01, "epochs": 1} and select["score"] == 100
    assert best.choices["seed"] == 0 and select["validation_samples"] == 6


def test_nll_chooses_the_lowest_score():
    cfg = load_config(None, [VAL, "retrain.select={grid: {lr: [0.1, 0.01, 0.001]}, metric: nll}"])
    labels = torch.tensor([0, 1, 2, 2])
    # every point predicts every image right; lr 0.01 is the most confident, so its NLL is lowest
    margin = {0.1: 1.0, 0.01: 3.0, 0.001: 2.0}
    fit = lambda point: Fixed(margin[point.lr] * torch.nn.functional.one_hot(labels, 3).float())  # noqa: E731
    best = select_on_validation(fit, cfg.retrain, torch.zeros(4, 4), labels, [10, 10, 10], cfg.data.shots)
    select = best.choices["select"]
    nll = [math.log(1 + 2 * math.exp(-m)) for m in margin.values()]
    assert [s["score"] for s in select["scores"]] == pytest.approx(nll)
    assert select["chosen"] == {"lr": 0.01} and select["score"] == pytest.approx(min(nll))


def test_a_point_that_fails_names_itself():
    cfg = load_config(None, [VAL, "retrain.select={grid: {lr: [0.1, 10.0]}}"])

    def fit(point):
        if point.lr == 10.0:
            raise TailaugError("the stage-3 loss became nan in epoch 1; lower retrain.lr")
        return Fixed(torch.zeros(2, 2))

    with pytest.raises(TailaugError, match=r"^retrain.select.grid point \{lr: 10.0\}: the stage-3 loss became nan"):
        select_on_validation(fit, cfg.retrain, torch.zeros(2, 4), torch.tensor([0, 1]), [5, 5], cfg.data.shots)


def tail_cache(seed: int = 0) -> dict:
    """Four classes of 8-d features (60, 30, 12, 6 training rows) that overlap: the choice matters."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(4, 8, generator=g)
    counts = [60, 30, 12, 6]

    def split(per_class):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
        return means[labels] + torch.randn(len(labels), 8, generator=g), labels

    cache = {"class_counts": torch.tensor(counts), "head_weight": torch.randn(4, 8, generator=g),
             "head_bias": torch.zeros(4)}
    cache["train_features"], cache["train_labels"] = split(counts)
    cache["train_index"] = torch.arange(len(cache["train_labels"]))
    for name, n in (("val", 10), ("test", 25)):
        cache[f"{name}_features"], cache[f"{name}_labels"] = split([n] * 4)
        cache[f"{name}_logits"] = torch.randn(4 * n, 4, generator=g)
    return cache


SELECT = [VAL, "retrain.epochs=3", "retrain.batch_size=16",
          "retrain.select={grid: {lr: [0.0001, 0.01, 0.3], weight_decay: [0.0, 0.1]}}"]


def test_the_choice_is_the_argmax_of_the_validation_scores_and_its_classifier_is_kept(tmp_path):
    cfg = load_config(None, SELECT)
    cache = tail_cache()
    label, row = pipeline.retrain(cfg, tmp_path / "a", cache, NoAugmenter(), progress=False)
    select = row["choices"]["select"]
    scores = [s["score"] for s in select["scores"]]
    first_best = scores.index(max(scores))
    assert select["chosen"] == select["scores"][first_best]["point"] and select["score"] == max(scores)
    assert first_best > 0 and len(set(scores)) > 1  # not simply the first point: the choice mattered
    assert label == "cRT [lr, weight_decay chosen on validation top1]"
    assert row["choices"]["seed"] == 0 and select["grid"] == cfg.retrain.select.grid

    # the test logits are those of the chosen point trained on its own, without select
    chosen = [f"retrain.{k}={v}" for k, v in select["chosen"].items()]
    plain = load_config(None, [VAL, "retrain.epochs=3", "retrain.batch_size=16", *chosen])
    _, direct = pipeline.retrain(plain, tmp_path / "b", cache, NoAugmenter(), progress=False)
    assert direct["metrics"] == row["metrics"]
    stored = json.loads(next((tmp_path / "a" / "retrain").glob("*.json")).read_text())
    assert stored["label"] == label and stored["config"]["select"]["grid"] == select["grid"]
    assert "lr" not in stored["config"] and stored["config"]["epochs"] == 3


def test_poisoned_test_labels_and_features_change_neither_the_choice_nor_the_validation_scores(tmp_path):
    cfg = load_config(None, SELECT)
    clean = tail_cache()
    poisoned = dict(clean)
    g = torch.Generator().manual_seed(1)
    poisoned["test_labels"] = clean["test_labels"][torch.randperm(len(clean["test_labels"]), generator=g)]
    poisoned["test_features"] = 5 * torch.randn(clean["test_features"].shape, generator=g)
    _, row = pipeline.retrain(cfg, tmp_path / "clean", clean, NoAugmenter(), progress=False)
    _, bad = pipeline.retrain(cfg, tmp_path / "poisoned", poisoned, NoAugmenter(), progress=False)
    assert bad["choices"]["select"] == row["choices"]["select"]
    assert bad["metrics"]["top1"] != row["metrics"]["top1"]  # the poison reached the test report only


def test_run_selects_every_row_on_validation_and_records_it(tmp_path, monkeypatch, capsys):
    """run_pipeline on a written feature cache: the cRT row chooses lr, the STG row lr and
    lambda; both are recorded in results.json and reused by a second run."""
    from safetensors.torch import save_file

    overrides = [*SELECT[:3], "stg.epochs=1", "stg.memory_size=16", "stg.head.rule=top_k", "stg.head.top_k=2",
                 "retrain.augmenter={name: stg, lam: 1.5}",
                 "retrain.select={grid: {augmenter.lam: [0.5, 1.5], lr: [0.01, 0.3]}}"]
    cfg = load_config(None, overrides)
    run_dir = tmp_path / "run"
    path = legacy_cache_path(run_dir, cfg)  # a single-file cache of earlier versions: still read
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tail_cache().items()}, path)
    monkeypatch.setattr(pipeline, "ensure_stage1", lambda *a, **k: None)
    results = pipeline.run_pipeline(cfg, run_dir, progress=False)
    crt, stg = "cRT [lr chosen on validation top1]", "cRT + STG [augmenter.lam, lr chosen on validation top1]"
    assert list(results) == ["stage 1", crt, stg]
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert rows[crt]["choices"]["select"]["grid"] == {"lr": [0.01, 0.3]}
    assert rows[stg]["choices"]["select"]["grid"] == {"augmenter.lam": [0.5, 1.5], "lr": [0.01, 0.3]}
    assert [s["point"] for s in rows[stg]["choices"]["select"]["scores"]] == cfg.retrain.select.points()
    out = capsys.readouterr().out
    assert f"stage 3: {stg}: augmenter.lam=" in out and "chosen on validation (top1 " in out

    monkeypatch.setattr(pipeline, "retrain_classifier", lambda *a, **k: pytest.fail("stage 3 trained again"))
    assert pipeline.run_pipeline(cfg, run_dir, progress=False) == results
