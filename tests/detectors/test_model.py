"""The composed detector: every on/off combination trains and infers; all-off is torchvision's."""
import copy
import itertools

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from detectors import build_detector
from detectors.bfp import BackboneWithBFP
from detectors.config import ConfigError, TrainConfig
from detectors.roi_heads import LibraRoIHeads, ProposalSampler, random_draw

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


def detector_cfg(sampling: bool, bfp: bool, bl1: bool, **extra):
    mapping = dict(TINY, **extra)
    mapping["iou_balanced_sampling"] = {"enabled": sampling}
    mapping["balanced_feature_pyramid"] = {"enabled": bfp}
    mapping["balanced_l1_loss"] = {"enabled": bl1}
    return TrainConfig.from_dict({"detector": mapping}).detector


def batch(seed: int = 0, with_boxes: bool = True):
    """Two images of different sizes; the second has no boxes unless with_boxes."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 120, generator=g), torch.rand(3, 100, 90, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 5.0, 110.0, 40.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[20.0, 20.0, 45.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    if not with_boxes:
        targets = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)} for _ in targets]
    return images, targets


@pytest.mark.parametrize("sampling,bfp,bl1", list(itertools.product([False, True], repeat=3)))
def test_every_combination_trains_one_step_and_infers(sampling, bfp, bl1):
    torch.manual_seed(0)
    model = build_detector(detector_cfg(sampling, bfp, bl1))
    assert isinstance(model.backbone, BackboneWithBFP) == bfp
    assert (model.roi_heads.sampler.neg_draw is not random_draw) == sampling
    images, targets = batch()

    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, img in zip(outputs, images):
        assert set(out) == {"boxes", "labels", "scores"}
        assert out["boxes"].shape[1] == 4 and out["boxes"].shape[0] == out["scores"].shape[0]
        # boxes come back in the input image's pixel frame
        assert (out["boxes"][:, 2] <= img.shape[2] + 1e-3).all() and (out["boxes"][:, 3] <= img.shape[1] + 1e-3).all()


@pytest.mark.parametrize("sampling,bl1", [(False, False), (True, True)])
def test_images_without_boxes_give_exactly_zero_box_loss(sampling, bl1):
    torch.manual_seed(0)
    model = build_detector(detector_cfg(sampling, True, bl1)).train()
    images, targets = batch(with_boxes=False)
    losses = model(images, targets)
    assert losses["loss_box_reg"].item() == 0.0
    assert losses["loss_rpn_box_reg"].item() == 0.0
    assert losses["loss_classifier"].item() > 0.0  # all RoIs are background and still trained
    sum(losses.values()).backward()


def torchvision_twin(ours):
    """torchvision's own FasterRCNN with the same parts' shapes, loaded with our weights."""
    cfg = detector_cfg(False, False, False)
    channels = ours.backbone.out_channels
    ref = FasterRCNN(
        copy.deepcopy(ours.backbone),
        num_classes=None,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=ours.transform.image_mean,
        image_std=ours.transform.image_std,
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_head=TwoMLPHead(channels * 49, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, cfg.num_classes + 1),
        box_batch_size_per_image=cfg.roi_batch_size_per_image,
    )
    ref.load_state_dict(ours.state_dict())
    return ref


def test_all_switches_off_reproduces_torchvision_faster_rcnn():
    torch.manual_seed(0)
    ours = build_detector(detector_cfg(False, False, False))
    assert type(ours.roi_heads) is LibraRoIHeads
    ref = torchvision_twin(ours)
    images, targets = batch()
    ours.train(), ref.train()
    torch.manual_seed(123)
    ours_losses = ours(images, targets)
    torch.manual_seed(123)
    ref_losses = ref(images, targets)
    assert set(ours_losses) == set(ref_losses)
    for name in ref_losses:
        torch.testing.assert_close(ours_losses[name], ref_losses[name], rtol=0, atol=0, msg=name)

    ours.eval(), ref.eval()
    with torch.no_grad():
        for a, b in zip(ours(images), ref(images)):
            for key in ("boxes", "labels", "scores"):
                torch.testing.assert_close(a[key], b[key])


def test_balanced_l1_changes_only_the_box_loss():
    torch.manual_seed(0)
    plain = build_detector(detector_cfg(False, False, False)).train()
    balanced = build_detector(detector_cfg(False, False, True)).train()
    balanced.load_state_dict(plain.state_dict())
    images, targets = batch()
    torch.manual_seed(7)
    a = plain(images, targets)
    torch.manual_seed(7)
    b = balanced(images, targets)
    for name in ("loss_classifier", "loss_objectness", "loss_rpn_box_reg"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert a["loss_box_reg"].item() != b["loss_box_reg"].item()


def test_iou_balanced_sampler_draws_more_hard_negatives():
    """The second stage's negatives under IoU-balanced sampling reach higher IoUs on average."""
    cfg = detector_cfg(True, False, False)
    model = build_detector(cfg).train()
    heads = model.roi_heads
    g = torch.Generator().manual_seed(0)
    # 2,000 negatives: most near IoU 0, a few hard ones up to 0.5 (as the paper measures)
    max_ious = torch.cat([torch.rand(1900, generator=g) * 0.05, 0.05 + torch.rand(100, generator=g) * 0.45])
    labels = torch.zeros(2000, dtype=torch.int64)
    matched = torch.zeros(2000, dtype=torch.int64)
    torch.manual_seed(0)
    balanced = heads.sample_proposals(labels, matched, max_ious)
    heads.sampler = ProposalSampler(batch_size_per_image=cfg.roi_batch_size_per_image)  # random draws
    torch.manual_seed(0)
    random = heads.sample_proposals(labels, matched, max_ious)
    assert len(balanced) == len(random) == cfg.roi_batch_size_per_image
    assert len(set(balanced.tolist())) == len(balanced)
    hard = lambda idx: (max_ious[idx] >= 0.05).float().mean().item()
    assert hard(balanced) > 2 * hard(random)


def test_the_sampler_is_one_injected_callable():
    """LibraRoIHeads trains on whatever the injected sampler picks: here the hardest negatives."""
    heads = build_detector(detector_cfg(False, False, False)).train().roi_heads
    hardest = lambda ious, num: ious.argsort(descending=True)[:num]
    heads.sampler = ProposalSampler(batch_size_per_image=4, positive_fraction=0.25, neg_draw=hardest)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, -1])
    max_ious = torch.tensor([0.1, 0.4, 0.2, 0.45, 0.0, 0.3, 0.6, 0.7, 0.45])
    keep = heads.sample_proposals(labels, torch.zeros(9, dtype=torch.int64), max_ious).tolist()
    assert keep == sorted(keep) and len(keep) == 4
    assert set(keep) - {6, 7} == {1, 3, 5} and len(set(keep) & {6, 7}) == 1  # 1 positive, never the ignored 8


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="detector.backbone"):
        build_detector(TrainConfig.from_dict({"detector": dict(TINY, backbone="resnet9000")}).detector)


def test_missing_pretrained_file_is_a_config_error(tmp_path):
    cfg = TrainConfig.from_dict({"detector": dict(TINY, pretrained=str(tmp_path / "nope.pth"))}).detector
    with pytest.raises(ConfigError, match="detector.pretrained"):
        build_detector(cfg)


def test_local_pretrained_weights_are_loaded(tmp_path):
    from detectors.backbones import TinyConvNet

    torch.manual_seed(3)
    body = TinyConvNet()
    torch.save(body.state_dict(), tmp_path / "tiny.pth")
    model = build_detector(detector_cfg(False, False, False, pretrained=str(tmp_path / "tiny.pth")))
    loaded = model.backbone.body.layer2[0][0].weight
    torch.testing.assert_close(loaded, body.layer2[0][0].weight)
