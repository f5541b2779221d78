"""Feature Space Augmentation (Chu et al.): CAM, the specific/generic split, confusing
classes, synthesis, and offline against online spatial maps."""

import numpy as np
import pytest
import torch

from tailaug.augment.base import AugmentContext, build_augmenter
from tailaug.augment.fsa import (FSAAugmenter, class_activation_map, confusing_classes, normalise_map,
                                 split_features, synthesise)
from tailaug.errors import ConfigError

from synthetic import class_images


def test_cam_of_a_hand_built_map_and_classifier_is_the_weighted_sum_of_channels():
    maps = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[3.0, 0.0], [1.0, 1.0]]]])  # [1, 2, 2, 2]
    weight = torch.tensor([[1.0, 0.0], [0.5, -2.0], [2.0, 1.0]])
    cam = class_activation_map(maps.repeat(2, 1, 1, 1), weight, torch.tensor([1, 2]))
    # class 1: 0.5 * F0 - 2 * F1; class 2: 2 * F0 + F1
    assert cam[0].tolist() == [[0.5 - 6.0, 1.0 - 0.0], [0.0 - 2.0, -0.5 - 2.0]]
    assert cam[1].tolist() == [[5.0, 4.0], [1.0, -1.0]]
    norm = normalise_map(cam)
    assert norm[1].flatten().tolist() == pytest.approx([1.0, 5 / 6, 2 / 6, 0.0])
    assert normalise_map(torch.ones(1, 2, 2)).eq(0).all()  # a flat map: nothing specific


def test_split_keeps_exactly_the_above_threshold_positions_and_the_parts_sum_to_the_map():
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 4, 5, 5, generator=gen)
    cam = torch.rand(3, 5, 5, generator=gen)
    specific, generic, mask = split_features(maps, cam, 0.6)
    assert torch.equal(mask, cam > 0.6)
    above = mask[:, None].expand_as(maps)
    assert torch.equal(specific[above], maps[above]) and specific[~above].eq(0).all()
    assert torch.equal(generic[~above], maps[~above]) and generic[above].eq(0).all()
    assert torch.equal(specific + generic, maps)


def test_confusing_classes_of_a_constructed_score_matrix():
    # class 0's rows score classes 2 then 3 highest; class 1's rows 0 then 3 (2 and 3 tie for the last place)
    scores = torch.log(torch.tensor([
        [0.5, 0.05, 0.3, 0.15], [0.5, 0.05, 0.3, 0.15],
        [0.3, 0.4, 0.15, 0.15], [0.3, 0.4, 0.15, 0.15],
        [0.1, 0.1, 0.1, 0.7],
    ]))
    labels = torch.tensor([0, 0, 1, 1, 3])
    assert confusing_classes(scores, labels, [0, 1], 2).tolist() == [[2, 3], [0, 2]]
    assert confusing_classes(scores, labels, [3], 1).tolist() == [[0]]  # ties: the lower class
    with pytest.raises(ConfigError, match="confusing = 4 must lie in 1..3"):
        confusing_classes(scores, labels, [0], 4)


def test_a_synthesised_feature_takes_specific_positions_from_the_tail_and_generic_from_the_donor():
    tail = torch.arange(1.0, 19.0).reshape(1, 2, 3, 3)
    donor = -torch.arange(1.0, 19.0).reshape(1, 2, 3, 3)
    tail_mask = torch.tensor([[[True, False, False], [False, True, False], [False, False, False]]])
    donor_cam = torch.tensor([[[0.0, 0.9, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.8]]])  # donor's own class evidence
    _, donor_generic, _ = split_features(donor, donor_cam, 0.5)
    new = synthesise(tail, tail_mask, donor_generic)
    at = tail_mask[:, None].expand_as(tail)
    assert torch.equal(new[at], tail[at])
    assert torch.equal(new[~at], donor_generic[~at])
    assert new[0, :, 0, 1].eq(0).all() and new[0, :, 2, 2].eq(0).all()  # the donor's specific part is left out
    assert new[0, 0, 0, 2] == -3.0


# ---------------------------------------------------------------------------- offline against online


@pytest.fixture(scope="module")
def stage1(one_thread):
    from tailaug.config import load_config
    from tailaug.data.datasets import LTData, Split
    from tailaug.models import build_model
    from tailaug.stages.stage1_model import Stage1Model, batch_transform

    cfg = load_config(None, ["model.arch=resnet20", "data.num_workers=0", "train.channels_last=false"])
    rng = np.random.default_rng(0)
    counts = [30, 20, 6, 4]
    labels = np.repeat(np.arange(4), counts)
    images = torch.from_numpy(class_images(labels, rng))
    split = Split(labels, images)
    data = LTData("toy", 4, 1, counts, split, split)
    torch.manual_seed(0)
    model = build_model(cfg.model, 4, 1).eval()
    return Stage1Model(cfg, data, model, batch_transform(cfg, data), torch.device("cpu"), None)


def _context(stage1, spatial):
    from tailaug.engine.inference import collect_outputs
    from tailaug.data.loaders import Batches

    out = collect_outputs(stage1.model, Batches(stage1.data.train, 64, stage1.transform, stage1.device),
                          stage1.device)
    return AugmentContext(features=out["features"], labels=out["labels"], class_counts=stage1.data.class_counts,
                          head_classes=[0, 1], classifier_weight=stage1.model.head.weight.detach(),
                          classifier_bias=stage1.model.head.bias.detach(), spatial=spatial), out


def test_the_spatial_maps_pool_to_the_cached_features(stage1):
    from tailaug.stages.spatial import backbone_maps

    maps = backbone_maps(stage1, stage1.data.train, torch.arange(60), 16, torch.float32)
    _, out = _context(stage1, None)
    assert maps.shape == (60, 64, 7, 7)
    assert torch.allclose(maps.mean((2, 3)), out["features"], atol=1e-5)


def test_offline_and_online_fsa_give_the_same_features_for_the_same_seed(stage1):
    from tailaug.stages.spatial import BackboneSpatialMaps, CachedSpatialMaps, backbone_maps

    train = stage1.data.train
    index = torch.arange(len(train))
    offline = CachedSpatialMaps(backbone_maps(stage1, train, index, 64, torch.bfloat16), index,
                                torch.as_tensor(train.labels))
    assert offline.stored.dtype == torch.bfloat16
    online = BackboneSpatialMaps(stage1, 7, torch.bfloat16)  # another batch size than the cache's
    outputs = []
    for spatial in (offline, online):
        ctx, out = _context(stage1, spatial)
        aug = build_augmenter({"name": "fsa", "confusing": 2, "per_class": 5})
        aug.fit(ctx)
        aug.set_epoch(0, 1)
        gen = torch.Generator().manual_seed(3)
        x, y = out["features"][:12], out["labels"][:12]
        outputs.append((aug(x, y, generator=gen), aug.draw(torch.Generator().manual_seed(3))))
    (feats_a, labels_a), draw_a = outputs[0]
    (feats_b, labels_b), draw_b = outputs[1]
    assert all(torch.equal(a, b) for a, b in zip(draw_a, draw_b))
    assert torch.equal(labels_a, labels_b) and set(labels_a[12:].tolist()) <= {2, 3}
    assert len(labels_a) == 12 + 2  # ceil(2 classes * 5 * 12 / 60 rows)
    assert torch.allclose(feats_a, feats_b, atol=1e-2, rtol=1e-2)
    assert torch.equal(feats_a[:12], out["features"][:12])  # the real rows are kept


def test_fsa_spreads_per_class_times_tail_classes_over_an_epoch(stage1):
    from tailaug.stages.spatial import CachedSpatialMaps, backbone_maps

    train = stage1.data.train
    index = torch.arange(len(train))
    spatial = CachedSpatialMaps(backbone_maps(stage1, train, index, 64, torch.float32), index,
                                torch.as_tensor(train.labels))
    ctx, out = _context(stage1, spatial)
    aug = build_augmenter({"name": "fsa", "confusing": 1, "per_class": 7, "tail_max": 6})
    aug.fit(ctx)
    assert aug.tail == [2, 3]
    assert aug.confusers.shape == (2, 1)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(2):
        aug.set_epoch(epoch, 2)
        added = []
        for start in range(0, 60, 16):
            x, y = out["features"][start:start + 16], out["labels"][start:start + 16]
            new_x, new_y = aug(x, y, generator=gen)
            added += new_y[len(y):].tolist()
        assert sorted(added) == [2] * 7 + [3] * 7


def test_fsa_without_spatial_maps_is_a_one_line_error_naming_the_fix():
    from tailaug.models import spatial_maps

    with pytest.raises(ConfigError) as info:
        spatial_maps(torch.nn.Linear(3, 3), torch.zeros(1, 3), "mlp")
    message = str(info.value)
    assert "\n" not in message and "model.arch mlp has no spatial feature maps" in message
    assert "use a ResNet backbone" in message
    ctx = AugmentContext(features=torch.randn(6, 3), labels=torch.tensor([0, 0, 0, 0, 1, 2]),
                         class_counts=[4, 1, 1], head_classes=[0], classifier_weight=torch.randn(3, 3))
    with pytest.raises(ConfigError, match="needs the spatial maps of the training images"):
        FSAAugmenter().fit(ctx)


@pytest.mark.parametrize("arch", ["resnet20", "resnet18"])
def test_every_resnet_backbone_offers_maps_whose_mean_is_its_feature(arch, one_thread):
    from tailaug.models import build_backbone, spatial_maps

    backbone = build_backbone(arch, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = spatial_maps(backbone, x, arch)
        assert maps.ndim == 4 and maps.shape[1] == backbone.feature_dim and maps.shape[2] > 1
        assert torch.allclose(maps.mean((2, 3)), backbone(x), atol=1e-5)
