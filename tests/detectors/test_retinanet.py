"""Libra RetinaNet: every on/off combination trains and infers; all-off is torchvision's RetinaNet."""
import copy
import itertools

import pytest
import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from detectors import build_detector
from detectors.bfp import BackboneWithBFP
from detectors.config import ConfigError, TrainConfig
from detectors.retinanet import LOSS_NAMES, BalancedL1RetinaNetHead, LibraRetinaNet, retinanet_anchor_sizes

TINY = {
    "arch": "retinanet",
    "backbone": "tiny",
    "num_classes": 3,
    "min_size": 96,
    "max_size": 128,
    "fpn_channels": 16,
}


def detector_cfg(bfp: bool, bl1: bool, **extra):
    mapping = dict(TINY, **extra)
    mapping["balanced_feature_pyramid"] = {"enabled": bfp, "refine_level": 1}
    mapping["balanced_l1_loss"] = {"enabled": bl1, "beta": 0.11}
    return TrainConfig.from_dict({"detector": mapping}).detector


def batch(seed: int = 0, with_boxes: bool = True):
    """Two images of different sizes; no boxes in either unless with_boxes."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 120, generator=g), torch.rand(3, 100, 90, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 5.0, 110.0, 40.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[20.0, 20.0, 45.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    if not with_boxes:
        targets = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)} for _ in targets]
    return images, targets


@pytest.mark.parametrize("bfp,bl1", list(itertools.product([False, True], repeat=2)))
def test_every_combination_trains_one_step_and_infers(bfp, bl1):
    torch.manual_seed(0)
    # score threshold 0 so inference returns boxes to check (at init every score is about 0.01)
    model = build_detector(detector_cfg(bfp, bl1, box_score_thresh=0.0))
    assert isinstance(model, LibraRetinaNet)
    assert isinstance(model.backbone, BackboneWithBFP) == bfp
    assert isinstance(model.head, BalancedL1RetinaNetHead) == bl1
    images, targets = batch()

    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():  # one SGD step, then the model must still infer
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, img in zip(outputs, images):
        assert set(out) == {"boxes", "labels", "scores"}
        assert len(out["boxes"]) > 0
        assert out["boxes"].shape[1] == 4 and out["boxes"].shape[0] == out["scores"].shape[0] == out["labels"].shape[0]
        # boxes come back in the input image's pixel frame; labels are object classes, never 0
        assert (out["boxes"][:, 2] <= img.shape[2] + 1e-3).all() and (out["boxes"][:, 3] <= img.shape[1] + 1e-3).all()
        assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()


def test_architecture_follows_retinanet():
    model = build_detector(detector_cfg(False, False))
    # 5 levels P3..P7 at strides 8..128; 9 anchors per location; classes + background column
    features = model.backbone(torch.zeros(1, 3, 128, 128))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert model.head.classification_head.num_classes == 3 + 1
    assert model.head.classification_head.num_anchors == 9
    # P6 from C5 (the tiny net's last stage has 128 channels), not from P5 (16 channels)
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 128
    # torchvision's anchor convention: x, x*2^(1/3), x*2^(2/3), truncated to ints
    assert retinanet_anchor_sizes((32, 64)) == ((32, 40, 50), (64, 80, 101))
    assert model.anchor_generator.sizes == retinanet_anchor_sizes((32, 64, 128, 256, 512))
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == (0.05, 0.5, 100)


def test_bfp_refines_at_the_configured_level():
    # refine_level 1 is P4 on RetinaNet's P3..P7 (the reference); the config value is not changed
    model = build_detector(detector_cfg(True, False))
    assert model.backbone.bfp.refine_level == 1 and model.backbone.bfp.num_levels == 5
    cfg = TrainConfig.from_dict({"detector": dict(TINY, balanced_feature_pyramid={"enabled": True})}).detector
    assert build_detector(cfg).backbone.bfp.refine_level == 2  # the default, P5 here: documented, kept


@pytest.mark.parametrize("bfp,bl1", [(False, False), (True, True)])
def test_images_without_boxes_give_exactly_zero_box_loss(bfp, bl1):
    torch.manual_seed(0)
    model = build_detector(detector_cfg(bfp, bl1)).train()
    images, targets = batch(with_boxes=False)
    losses = model(images, targets)
    assert losses["loss_box_reg"].item() == 0.0
    assert losses["loss_classifier"].item() > 0.0  # every anchor is background and still trained
    sum(losses.values()).backward()


def test_one_empty_image_leaves_the_other_images_loss_unchanged():
    # the box loss is a mean over images of per-image normalised sums: an empty image adds 0
    torch.manual_seed(0)
    model = build_detector(detector_cfg(False, True)).train()
    images, targets = batch()
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    both = model([images[0], images[0]], [targets[0], empty])
    alone = model([images[0]], [targets[0]])
    torch.testing.assert_close(both["loss_box_reg"], alone["loss_box_reg"] / 2)


def torchvision_twin(ours, cfg):
    """torchvision's own RetinaNet with the same parts' shapes, loaded with our weights."""
    ref = RetinaNet(
        copy.deepcopy(ours.backbone),
        num_classes=cfg.num_classes + 1,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=ours.transform.image_mean,
        image_std=ours.transform.image_std,
        anchor_generator=AnchorGenerator(retinanet_anchor_sizes(cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5),
        head=RetinaNetHead(ours.backbone.out_channels, 9, cfg.num_classes + 1),
        score_thresh=cfg.box_score_thresh,
        nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.box_detections_per_img,
    )
    ref.load_state_dict(ours.state_dict())
    return ref


def test_all_switches_off_reproduces_torchvision_retinanet():
    torch.manual_seed(0)
    cfg = detector_cfg(False, False, box_score_thresh=0.0)  # 0: inference has boxes to compare
    ours = build_detector(cfg)
    assert type(ours.head) is RetinaNetHead
    ref = torchvision_twin(ours, cfg)
    images, targets = batch()
    ours.train(), ref.train()
    ours_losses = ours(images, targets)
    ref_losses = ref(images, targets)
    assert set(ours_losses) == {LOSS_NAMES[name] for name in ref_losses}
    for name in ref_losses:
        torch.testing.assert_close(ours_losses[LOSS_NAMES[name]], ref_losses[name], rtol=0, atol=0, msg=name)

    # Inference: torchvision's detections without those of the background column 0
    ours.eval(), ref.eval()
    with torch.no_grad():
        for a, b in zip(ours(images), ref(images)):
            assert (b["labels"] == 0).any() and len(a["labels"]) > 0  # the filter has work to do
            objects = b["labels"] > 0
            for key in ("boxes", "labels", "scores"):
                torch.testing.assert_close(a[key], b[key][objects], rtol=0, atol=0)


def test_balanced_l1_changes_only_the_box_loss():
    torch.manual_seed(0)
    plain = build_detector(detector_cfg(False, False)).train()
    torch.manual_seed(0)
    balanced = build_detector(detector_cfg(False, True)).train()
    # same seed, same initial weights: the switch changes the loss and nothing else
    for (name, a), b in zip(plain.state_dict().items(), balanced.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    images, targets = batch()
    a = plain(images, targets)
    b = balanced(images, targets)
    torch.testing.assert_close(a["loss_classifier"], b["loss_classifier"], rtol=0, atol=0)
    assert a["loss_box_reg"].item() != b["loss_box_reg"].item()


def test_balanced_l1_box_loss_matches_a_hand_computation():
    """The head's box loss is sum over foreground / max(1, foreground) per image, mean over images."""
    head = BalancedL1RetinaNetHead(8, 1, 2, alpha=0.5, gamma=1.5, beta=1.0)
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]])] * 2
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}, {"boxes": torch.zeros((0, 4))}]
    matched = [torch.tensor([0, -1]), torch.tensor([-1, -1])]
    pred = torch.zeros(2, 2, 4)
    pred[0, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])  # the gt equals the anchor: target deltas 0
    pred[1] = 5.0  # background anchors of the empty image: never in the loss
    # image 0: one outlier |x| = 2 -> gamma*2 + C = 3 + 1.5/b - 0.5, b = e^3 - 1; image 1: 0
    b = torch.e ** 3 - 1
    expected = (3.0 + 1.5 / b - 0.5) / 1 / 2
    loss = head.box_regression_loss(targets, pred, anchors, matched)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_iou_balanced_sampling_on_retinanet_is_a_config_error():
    with pytest.raises(ConfigError, match="detector.iou_balanced_sampling.enabled"):
        TrainConfig.from_dict({"detector": dict(TINY, iou_balanced_sampling={"enabled": True})})
    # left unset, the two-stage default (on) does not apply to a RetinaNet
    cfg = TrainConfig.from_dict({"detector": dict(TINY)}).detector
    assert cfg.iou_balanced_sampling.enabled is False


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="detector.backbone"):
        build_detector(TrainConfig.from_dict({"detector": dict(TINY, backbone="resnet9000")}).detector)


def test_fit_trains_and_evaluates_a_retinanet(tmp_path):
    """One epoch through the engine, the path `libra train` and study trials take."""
    from detectors.data.synthetic import CLASSES
    from detectors.engine import fit

    detector = dict(
        TINY,
        num_classes=len(CLASSES),
        box_score_thresh=0.0,  # so evaluation has detections to score after two steps
        balanced_feature_pyramid={"enabled": True, "refine_level": 1},
        balanced_l1_loss={"enabled": True, "beta": 0.11},
    )
    cfg = TrainConfig.from_dict({
        "detector": detector,
        "data": {"kind": "synthetic", "root": str(tmp_path / "data"),
                 "synthetic": {"num_train": 4, "num_val": 2, "image_size": 96, "seed": 0}},
        "schedule": {"epochs": 1, "batch_size": 2, "lr": 0.01, "warmup_iters": 1, "lr_steps": [],
                     "amp": False, "device": "cpu"},
    })
    result = fit(cfg, str(tmp_path / "run"), progress=False)
    final = result["final"]
    assert {"loss", "loss_classifier", "loss_box_reg"} <= set(final)
    assert 0.0 <= final["bbox_mAP"] <= 1.0


@pytest.mark.parametrize("bl1", [False, True])
def test_head_norm_group_puts_groupnorm_in_both_subheads_and_trains(bl1):
    torch.manual_seed(0)
    model = build_detector(detector_cfg(False, bl1, fpn_channels=32, head_norm="group")).train()
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 8 and all(m.num_groups == 32 for m in norms)  # 4 convs x 2 sub-heads
    images, targets = batch()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_head_norm_group_needs_channels_divisible_by_32():
    with pytest.raises(ConfigError, match="head_norm"):
        detector_cfg(False, False, fpn_channels=16, head_norm="group")
