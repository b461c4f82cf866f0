"""Reference-fidelity switches (issue 11): each key selects the reference's behaviour, checked
against closed forms written from the reference's equations, not against its code."""
import math

import pytest
import torch

from detectors import build_detector
from detectors.build import build_rcnn_box_loss
from detectors.config import ConfigError, TrainConfig

TINY = {
    "backbone": "tiny",
    "num_classes": 3,
    "min_size": 96,
    "max_size": 128,
    "fpn_channels": 16,
    "representation_size": 32,
    "roi_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
}


def detector(**extra):
    return TrainConfig.from_dict({"detector": dict(TINY, **extra)}).detector


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 120, generator=g), torch.rand(3, 100, 90, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 5.0, 110.0, 40.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[20.0, 20.0, 45.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


# ------------------------------------------------------------------ item 1: the R-CNN box loss
# Differences 0.05 (inlier for every beta here) and 2.0 (outlier), summed over the elements.
PRED = torch.tensor([[0.05, 2.0]], dtype=torch.float64)
ZERO = torch.zeros_like(PRED)


@pytest.mark.parametrize("box_loss,bl1,expected", [
    # smooth L1 beta 1/9: 0.5 * 0.05^2 * 9 + (2 - 0.5 / 9)
    ({}, False, 0.5 * 0.05 ** 2 * 9 + 2 - 0.5 / 9),
    # smooth L1 beta 1 (CVPR release, mmdet v1): 0.5 * 0.05^2 + (2 - 0.5)
    ({"beta": 1.0}, False, 0.5 * 0.05 ** 2 + 1.5),
    # L1 (mmdet v2): 0.05 + 2
    ({"type": "l1"}, False, 2.05),
    # L1 at weight 1.5: 1.5 * 2.05
    ({"type": "l1", "loss_weight": 1.5}, False, 3.075),
    # balanced L1 (alpha 0.5, gamma 1.5, beta 1), b = e^3 - 1, weight 2:
    # 2 * (0.5 / b * (0.05 b + 1) ln(0.05 b + 1) - 0.025 + 1.5 * 2 + 1.5 / b - 0.5)
    ({"loss_weight": 2.0}, True, None),
    ({"type": "balanced_l1"}, True, None),
])
def test_rcnn_box_loss_choice_closed_form(box_loss, bl1, expected):
    cfg = detector(box_loss=box_loss, balanced_l1_loss={"enabled": bl1})
    if expected is None:
        b = math.exp(3.0) - 1
        inlier = 0.5 / b * (0.05 * b + 1) * math.log(0.05 * b + 1) - 0.025
        expected = box_loss.get("loss_weight", 1.0) * (inlier + 3.0 + 1.5 / b - 0.5)
    assert cfg.rcnn_box_loss == ("balanced_l1" if bl1 else box_loss.get("type", "smooth_l1"))
    assert build_rcnn_box_loss(cfg)(PRED, ZERO).item() == pytest.approx(expected, rel=1e-12)


def test_balanced_l1_reference_formulation_reaches_the_rcnn_head():
    # At beta 0.11 the reference's inlier gradient at 0.05 is 1.5529 (fidelity-audit exp. 1).
    pred = torch.tensor([0.05], dtype=torch.float64, requires_grad=True)
    cfg = detector(balanced_l1_loss={"beta": 0.11, "formulation": "reference"})
    build_rcnn_box_loss(cfg)(pred, torch.zeros_like(pred)).backward()
    assert pred.grad.item() == pytest.approx(1.5529, abs=1e-4)


def test_loss_weight_scales_only_the_box_loss_of_the_model():
    torch.manual_seed(0)
    plain = build_detector(detector(iou_balanced_sampling={"enabled": False})).train()
    heavy = build_detector(detector(iou_balanced_sampling={"enabled": False}, box_loss={"loss_weight": 2.0})).train()
    heavy.load_state_dict(plain.state_dict())
    images, targets = batch()
    torch.manual_seed(7)
    a = plain(images, targets)
    torch.manual_seed(7)
    b = heavy(images, targets)
    for name in ("loss_classifier", "loss_objectness", "loss_rpn_box_reg"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    torch.testing.assert_close(b["loss_box_reg"], 2 * a["loss_box_reg"])


def test_balanced_l1_type_without_its_switch_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"detector\.box_loss\.type is balanced_l1 but detector\.balanced_l1_loss\.enabled is false"):
        detector(box_loss={"type": "balanced_l1"}, balanced_l1_loss={"enabled": False})


@pytest.mark.parametrize("box_loss,key", [({"beta": 0.0}, "beta"), ({"loss_weight": -1.0}, "loss_weight"),
                                          ({"type": "huber"}, "type")])
def test_bad_box_loss_settings_name_the_key(box_loss, key):
    with pytest.raises(ConfigError, match=rf"detector\.box_loss\.{key}"):
        detector(box_loss=box_loss)


def test_bad_formulation_names_the_key():
    with pytest.raises(ConfigError, match=r"detector\.balanced_l1_loss\.formulation"):
        detector(balanced_l1_loss={"formulation": "mmdet"})


def test_retinanet_head_takes_the_formulation():
    cfg = detector(arch="retinanet", balanced_l1_loss={"beta": 0.11, "formulation": "reference"})
    assert build_detector(cfg).head.formulation == "reference"


# ------------------------------------------------------------------ item 3: IoU-balanced bin edges
from detectors.sampling import iou_balanced_neg_sample  # noqa: E402

# 200 negatives at IoU 0, 100 at 0.1, 100 at 0.2, 30 at 0.4; draw 90 over K = 3 bins (30 each).
GROUPS = {"zero": 0.0, "b": 0.1, "c": 0.2, "d": 0.4}
SIZES = {"zero": 200, "b": 100, "c": 100, "d": 30}
IOUS = torch.cat([torch.full((SIZES[k],), v) for k, v in GROUPS.items()])


def _counts(bin_max, zero_iou, draws=200, k=3, num=90, ious=IOUS):
    """Mean number drawn from each group over `draws` seeded draws."""
    g = torch.Generator().manual_seed(0)
    totals = dict.fromkeys(GROUPS, 0)
    for _ in range(draws):
        picked = ious[iou_balanced_neg_sample(ious, num, num_bins=k, bin_max=bin_max, zero_iou=zero_iou, generator=g)]
        assert picked.numel() == num
        for name, value in GROUPS.items():
            totals[name] += int((picked == value).sum())
    return {name: total / draws for name, total in totals.items()}


def test_bins_ours_span_the_negatives_range():
    # Edges 0, .133, .267, .4: {zero, b} | {c} | {d}, 30 each, no shortfall.
    c = _counts(None, "in_bins")
    assert (c["zero"] + c["b"], c["c"], c["d"]) == (30, 30, 30)


def test_bins_reference_cvpr_release_edges_at_thirds():
    # Edges 0, 1/3, 2/3, 1: {zero, b, c} (400) | {d} | {} -> 30, 30 (all of d), 0; the empty top
    # bin's 30 come at random from the 370 left in bin 0, proportionally to the groups' sizes:
    # zero 60 * 200/400 = 30, b and c 15 each.
    c = _counts(1.0, "in_bins")
    assert c["d"] == 30
    assert c["zero"] == pytest.approx(30, abs=1.5)
    assert c["b"] == pytest.approx(15, abs=1.0) and c["c"] == pytest.approx(15, abs=1.0)


def test_bins_reference_mmdet_v2_zero_iou_fill_only():
    # IoU = 0 leaves the bins: {b, c} (200) | {d} | {} -> 30, 30, 0, and the 30 short are filled
    # from the bin candidates first, so no IoU-0 negative is drawn while b and c have any left.
    c = _counts(1.0, "fill_only")
    assert c["zero"] == 0 and c["d"] == 30
    assert c["b"] == pytest.approx(30, abs=1.5) and c["c"] == pytest.approx(30, abs=1.5)


def test_zero_iou_fill_only_with_our_edges():
    # Bins over IoU > 0 only, edges 0, .133, .267, .4: {b} | {c} | {d}, exactly 30 each.
    assert _counts(None, "fill_only", draws=5) == {"zero": 0, "b": 30, "c": 30, "d": 30}


def test_zero_iou_negatives_fill_when_the_rest_run_out():
    # 60 IoU > 0 negatives for a budget of 90: the last 30 must come from IoU = 0.
    ious = torch.cat([torch.zeros(100), torch.full((30,), 0.1), torch.full((30,), 0.4)])
    picked = ious[iou_balanced_neg_sample(ious, 90, bin_max=1.0, zero_iou="fill_only")]
    assert (picked == 0).sum() == 30


def test_two_bins_at_the_reference_edge_are_random_sampling():
    # K = 2, bin_max 1: edges 0, .5, 1, every negative (IoU < .5) in bin 0 -> uniform draw:
    # 100 of 400 candidates are at .45, so a quarter of the draw. Ours splits at .225: half.
    ious = torch.cat([torch.zeros(300), torch.full((100,), 0.45)])
    ours = _counts(None, "in_bins", k=2, num=80, ious=ious)
    ref = _counts(1.0, "in_bins", k=2, num=80, ious=ious)
    hard_ours = 80 - ours["zero"]
    hard_ref = 80 - ref["zero"]
    assert hard_ours == 40
    assert hard_ref == pytest.approx(20, abs=1.0)


@pytest.mark.parametrize("bad,match", [({"bin_max": 1.5}, "bin_max"), ({"bin_max": 0.0}, "bin_max"),
                                       ({"floor_thr": 0.2, "bin_max": 0.1}, "bin_max"),
                                       ({"zero_iou": "floor"}, "zero_iou")])
def test_bad_sampler_keys_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=rf"detector\.iou_balanced_sampling\.{match}"):
        detector(iou_balanced_sampling=bad)


def test_sampler_keys_reach_the_model():
    cfg = detector(iou_balanced_sampling={"bin_max": 1.0, "zero_iou": "fill_only"})
    neg_draw = build_detector(cfg).roi_heads.sampler.neg_draw  # functools.partial of the sampler
    assert neg_draw.func is iou_balanced_neg_sample
    assert (neg_draw.keywords["bin_max"], neg_draw.keywords["zero_iou"]) == (1.0, "fill_only")


# ------------------------------------------------------------------ item 5: backbone BatchNorm
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

from detectors.backbones import FrozenStatsBatchNorm2d, TinyConvNet, imagenet_weights  # noqa: E402


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(3)
    body = TinyConvNet()
    for m in body.modules():  # non-trivial statistics, so "frozen" is visible in the output
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "tiny.pth"
    torch.save(body.state_dict(), path)
    return str(path)


def _body(model):
    backbone = model.backbone
    return getattr(backbone, "backbone", backbone).body  # under the BFP wrapper when it is on


def _norms(model):
    return [m for m in _body(model).modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]


def test_frozen_stats_bn_trains_the_affine_of_the_unfrozen_stages_only(tiny_weights):
    # trainable_backbone_layers 3: layer2..layer4 train, stem and layer1 are frozen (frozen_stages=1).
    model = build_detector(detector(pretrained=tiny_weights, backbone_norm="frozen_stats", trainable_backbone_layers=3))
    norms = _norms(model)
    assert norms and all(type(m) is FrozenStatsBatchNorm2d for m in norms)
    grad = {name: p.requires_grad for name, p in _body(model).named_parameters()}
    bn_params = {name: g for name, g in grad.items() if ".1.weight" in name or ".1.bias" in name or "bn" in name}
    for name, requires in bn_params.items():
        trainable_stage = name.startswith(("layer2", "layer3", "layer4"))
        assert requires == trainable_stage, name
    assert any(bn_params.values()) and not all(bn_params.values())


def test_frozen_bn_has_no_trainable_affine(tiny_weights):
    model = build_detector(detector(pretrained=tiny_weights, trainable_backbone_layers=3))
    assert all(type(m) is FrozenBatchNorm2d for m in _norms(model))
    # FrozenBatchNorm2d keeps weight and bias as buffers: only conv weights are parameters.
    assert all(p.dim() == 4 for p in _body(model).parameters())


def test_frozen_stats_bn_uses_running_statistics_and_never_updates_them(tiny_weights):
    model = build_detector(detector(pretrained=tiny_weights, backbone_norm="frozen_stats")).train()
    bn = _norms(model)[0]
    before = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(4, bn.num_features, 5, 5) * 3 + 2
    y = bn(x)
    expected = (x - before[0][None, :, None, None]) / torch.sqrt(before[1][None, :, None, None] + bn.eps)
    expected = expected * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(bn.running_mean, before[0], rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, before[1], rtol=0, atol=0)
    y.sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None


def test_frozen_stats_without_pretrained_weights_is_a_config_error():
    with pytest.raises(ConfigError, match=r"detector\.backbone_norm"):
        detector(backbone_norm="frozen_stats")


# ------------------------------------------------------------------ item 10: pretrained versions
def test_imagenet_names_pick_torchvision_weight_versions():
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    assert imagenet_weights("resnet50", "imagenet") is ResNet50_Weights.IMAGENET1K_V2  # DEFAULT, as before
    assert imagenet_weights("resnet50", "imagenet_v1") is ResNet50_Weights.IMAGENET1K_V1
    assert imagenet_weights("resnet50", "imagenet_v2") is ResNet50_Weights.IMAGENET1K_V2
    assert imagenet_weights("resnet18", "imagenet") is ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(ConfigError, match=r"detector\.pretrained: torchvision has no IMAGENET1K_V2 weights for resnet18"):
        imagenet_weights("resnet18", "imagenet_v2")


def test_imagenet_v1_on_tiny_is_a_config_error():
    with pytest.raises(ConfigError, match=r"detector\.pretrained"):
        build_detector(detector(pretrained="imagenet_v1"))


# ------------------------------------------------------------------ item 6: BFP non-local init
from detectors.bfp import BalancedFeaturePyramid, xavier_init_  # noqa: E402


def _xavier_bound(conv):
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_bfp_xavier_init_statistics_and_non_identity():
    torch.manual_seed(0)
    bfp = xavier_init_(BalancedFeaturePyramid(64, 5))
    convs = [bfp.refine.theta, bfp.refine.phi, bfp.refine.g, bfp.refine.out]
    for conv in convs:
        bound = _xavier_bound(conv)  # uniform(-a, a): variance a^2 / 3 = 2 / (fan_in + fan_out)
        w = conv.weight
        assert w.abs().max().item() <= bound
        assert w.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)
        assert conv.bias.abs().max().item() == 0
    x = torch.randn(2, 64, 12, 16)
    rel = ((bfp.refine(x) - x).norm() / x.norm()).item()
    assert rel > 0.1  # the audit measures 0.91 at 256 channels


def test_bfp_identity_init_is_the_default_and_the_identity():
    torch.manual_seed(0)
    cfg = detector(balanced_feature_pyramid={"enabled": True})
    refine = build_detector(cfg).backbone.bfp.refine
    x = torch.randn(1, 16, 6, 7)
    torch.testing.assert_close(refine(x), x, rtol=0, atol=0)
    ref_cfg = detector(balanced_feature_pyramid={"enabled": True, "init": "xavier"})
    ref = build_detector(ref_cfg).backbone.bfp.refine
    assert ref.out.weight.abs().max().item() > 0
    assert ref.theta.weight.std().item() == pytest.approx(_xavier_bound(ref.theta) / math.sqrt(3), rel=0.1)


# ------------------------------------------------------------------ item 8: box-head init
def test_reference_box_head_init_statistics():
    torch.manual_seed(0)
    cfg = detector(representation_size=256, num_classes=20, box_head_init="reference")
    heads = build_detector(cfg).roi_heads
    for fc in (heads.box_head.fc6, heads.box_head.fc7):
        bound = math.sqrt(6.0 / (fc.in_features + fc.out_features))
        assert fc.weight.abs().max().item() <= bound
        assert fc.weight.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)
        assert fc.bias.abs().max().item() == 0
    cls, reg = heads.box_predictor.cls_score, heads.box_predictor.bbox_pred
    assert cls.weight.std().item() == pytest.approx(0.01, rel=0.05)  # 21 x 256 samples
    assert reg.weight.std().item() == pytest.approx(0.001, rel=0.05)  # 84 x 256
    assert abs(cls.weight.mean().item()) < 0.001 and abs(reg.weight.mean().item()) < 0.0001
    assert cls.bias.abs().max().item() == 0 and reg.bias.abs().max().item() == 0


def test_torchvision_box_head_init_is_the_default():
    torch.manual_seed(0)
    heads = build_detector(detector(representation_size=256, num_classes=20)).roi_heads
    reg = heads.box_predictor.bbox_pred
    # nn.Linear's default: kaiming-uniform(a = sqrt 5), i.e. uniform(+-1/sqrt(fan_in)): std 1/sqrt(3 * 256)
    assert reg.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)
    assert reg.bias.abs().max().item() > 0


# ------------------------------------------------------------------ item 7: RPN sampling
from detectors.rpn import CappedNegativeSampler, LibraRPN  # noqa: E402


@pytest.mark.parametrize("num_pos,ub,expected", [
    (10, 5.0, (10, 50)),     # 5 negatives per positive
    (0, 5.0, (0, 5)),        # at least one "positive" in the bound: 5 * max(1, 0)
    (200, 5.0, (128, 128)),  # the budget binds first: 256 - 128
    (10, -1.0, (10, 246)),   # no cap: torchvision's 256 - 10
])
def test_rpn_neg_pos_ub_caps_negatives(num_pos, ub, expected):
    labels = torch.zeros(2000)
    labels[:num_pos] = 1
    labels[-100:] = -1  # ignored anchors are never drawn
    pos, neg = CappedNegativeSampler(256, 0.5, ub)([labels])
    assert (int(pos[0].sum()), int(neg[0].sum())) == expected
    assert not (neg[0].bool() & (labels != 0)).any() and not (pos[0].bool() & (labels < 1)).any()


def test_rpn_allowed_border_flags_anchors_by_the_unpadded_size():
    rpn = build_detector(detector(rpn_allowed_border=0)).rpn
    assert isinstance(rpn, LibraRPN)
    anchors = torch.tensor([[0.0, 0.0, 50.0, 40.0],     # inside a 60 (H) x 80 (W) image
                            [-1.0, 0.0, 50.0, 40.0],    # 1 px over the left edge
                            [10.0, 10.0, 80.0, 59.0],   # x2 = W: outside (x2 < W + border)
                            [10.0, 10.0, 79.0, 59.0]])
    assert rpn.inside(anchors, (60, 80)).tolist() == [True, False, False, True]
    rpn.allowed_border = 2
    assert rpn.inside(anchors, (60, 80)).tolist() == [True, True, True, True]


def test_rpn_allowed_border_ignores_outside_anchors_in_the_loss():
    torch.manual_seed(0)
    every = build_detector(detector(iou_balanced_sampling={"enabled": False})).train()
    inside = build_detector(detector(iou_balanced_sampling={"enabled": False}, rpn_allowed_border=0)).train()
    inside.load_state_dict(every.state_dict())
    images, targets = batch()
    torch.manual_seed(7)
    a = every(images, targets)
    torch.manual_seed(7)
    b = inside(images, targets)
    assert torch.isfinite(b["loss_objectness"]) and b["loss_objectness"].item() != a["loss_objectness"].item()


@pytest.mark.parametrize("key,value", [("rpn_neg_pos_ub", 0.0), ("rpn_allowed_border", -2)])
def test_bad_rpn_keys_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"detector\.{key}"):
        detector(**{key: value})


# ------------------------------------------------------------------ item 9: images without boxes
import json  # noqa: E402

from PIL import Image  # noqa: E402

from detectors.config import DataConfig  # noqa: E402
from detectors.data import build_datasets  # noqa: E402


def write_set(root, images, annotations):
    """A COCO JSON with grey PNGs under `root`; images [(id, w, h)] -> (images_dir, json path)."""
    (root / "images").mkdir()
    records = []
    for image_id, width, height in images:
        Image.new("RGB", (width, height), (90, 90, 90)).save(root / "images" / f"{image_id}.png")
        records.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations,
                                "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}))
    return str(root / "images"), str(path)


def ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": float(bbox[2] * bbox[3]), "iscrowd": iscrowd}


def test_training_skips_images_without_boxes_when_asked(tmp_path):
    # 1: a box; 2: nothing; 3: only a crowd region; 4: only a degenerate (zero-area) box.
    images_dir, ann_file = write_set(
        tmp_path, [(1, 40, 30), (2, 20, 20), (3, 20, 20), (4, 20, 20)],
        [ann(1, 1, 7, [2, 3, 10, 5]), ann(2, 3, 3, [0, 0, 10, 10], iscrowd=1), ann(3, 4, 3, [5, 5, 0, 4])])
    paths = dict(kind="coco", train_images=images_dir, train_annotations=ann_file,
                 val_images=images_dir, val_annotations=ann_file)
    with pytest.warns(UserWarning):  # the dropped degenerate box
        train, val = build_datasets(DataConfig(**paths, skip_images_without_boxes=True))
    assert train.image_ids == [1] and len(train) == 1
    assert val.image_ids == [1, 2, 3, 4]  # evaluation keeps every image
    with pytest.warns(UserWarning):
        kept, _ = build_datasets(DataConfig(**paths))
    assert kept.image_ids == [1, 2, 3, 4]


# ------------------------------------------------------------------ item 11: evaluation batch
def test_eval_batch_size_is_separate_from_the_training_batch():
    cfg = TrainConfig.from_dict({"schedule": {"batch_size": 2, "eval_batch_size": 1}})
    assert (cfg.schedule.batch_size, cfg.schedule.evaluation_batch_size) == (2, 1)
    assert TrainConfig.from_dict({"schedule": {"batch_size": 4}}).schedule.evaluation_batch_size == 4
    with pytest.raises(ConfigError, match=r"schedule\.eval_batch_size"):
        TrainConfig.from_dict({"schedule": {"eval_batch_size": 0}})


# ------------------------------------------------------------------ item 13: RetinaNet details
import torch.nn.functional as F  # noqa: E402
from torchvision.models.detection.retinanet import RetinaNetHead  # noqa: E402

from detectors.retinanet import BoxLossRetinaNetHead, LastLevelP6P7NoReLU  # noqa: E402


def _retina_case():
    """Image 0: 1 foreground anchor off by |x| = 0.05 in dx; image 1: 3 foreground anchors, each
    off by 0.2 in dx (every gt equals its anchor, so the target deltas are 0)."""
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)] * 2
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}] * 2
    matched = [torch.tensor([0, -1, -1]), torch.tensor([0, 0, 0])]
    pred = torch.zeros(2, 3, 4, dtype=torch.float32)
    pred[0, 0, 0] = 0.05
    pred[1, :, 0] = 0.2
    pred[0, 1:] = 9.0  # background: never in the loss
    return targets, pred, anchors, matched


def test_retinanet_l1_per_image_head_equals_torchvision():
    torch.manual_seed(0)
    ours = BoxLossRetinaNetHead(8, 3, 2, box_loss=lambda p, t: F.l1_loss(p, t, reduction="sum"))
    ref = RetinaNetHead(8, 3, 2)
    targets, pred, anchors, matched = _retina_case()
    got = ours.box_regression_loss(targets, pred, anchors, matched)
    want = ref.regression_head.compute_loss(targets, {"bbox_regression": pred}, anchors, matched)
    torch.testing.assert_close(got, want)
    assert got.item() == pytest.approx((0.05 / 1 + 0.6 / 3) / 2, rel=1e-6)


@pytest.mark.parametrize("extra,expected", [
    # smooth L1 beta 0.11, per image: 0.5 * 0.05^2 / 0.11 = 0.0113636; 0.2 - 0.055 = 0.145 each
    ({"retinanet_box_loss": "smooth_l1"}, (0.5 * 0.05 ** 2 / 0.11 + 3 * 0.145 / 3) / 2),
    # the same over the batch: (0.0113636 + 3 * 0.145) / 4 foreground anchors
    ({"retinanet_box_loss": "smooth_l1", "retinanet_box_loss_norm": "batch"}, (0.5 * 0.05 ** 2 / 0.11 + 0.435) / 4),
    # L1 over the batch: (0.05 + 0.6) / 4
    ({"retinanet_box_loss_norm": "batch"}, 0.65 / 4),
])
def test_retinanet_reference_box_loss_closed_form(extra, expected):
    cfg = detector(arch="retinanet", balanced_l1_loss={"enabled": False}, **extra)
    head = build_detector(cfg).head
    assert type(head) is BoxLossRetinaNetHead
    assert head.box_regression_loss(*_retina_case()).item() == pytest.approx(expected, rel=1e-5)


def test_retinanet_balanced_l1_with_batch_normalisation():
    cfg = detector(arch="retinanet", retinanet_box_loss_norm="batch",
                   balanced_l1_loss={"beta": 0.11, "formulation": "reference"})
    head = build_detector(cfg).head
    b = math.exp(3.0) - 1
    # reference formulation, beta 0.11: inlier 0.05, outlier 0.2 (value gamma|x| + gamma/b - alpha*beta)
    inlier = 0.5 / b * (0.05 * b + 1) * math.log(0.05 * b / 0.11 + 1) - 0.025
    outlier = 1.5 * 0.2 + 1.5 / b - 0.5 * 0.11
    assert head.box_regression_loss(*_retina_case()).item() == pytest.approx((inlier + 3 * outlier) / 4, rel=1e-5)


def test_retinanet_defaults_keep_torchvisions_head_and_p7():
    model = build_detector(detector(arch="retinanet", balanced_l1_loss={"enabled": False},
                                    balanced_feature_pyramid={"enabled": False}))
    assert type(model.head) is RetinaNetHead
    assert type(model.backbone.fpn.extra_blocks).__name__ == "LastLevelP6P7"


def test_retinanet_p7_without_relu():
    torch.manual_seed(0)
    block = LastLevelP6P7NoReLU(4, 4)
    block.use_P5 = False
    c5 = torch.randn(1, 4, 8, 8)
    p, names = block([torch.zeros(1, 4, 8, 8)], [c5], ["p5"])
    p6, p7 = p[1], p[2]
    torch.testing.assert_close(p7, block.p7(p6))  # no ReLU between
    assert (p6 < 0).any() and not torch.allclose(p7, block.p7(F.relu(p6)))
    assert names == ["p5", "p6", "p7"]
    model = build_detector(detector(arch="retinanet", retinanet_p7_relu=False,
                                    balanced_feature_pyramid={"enabled": False}))
    assert type(model.backbone.fpn.extra_blocks) is LastLevelP6P7NoReLU
