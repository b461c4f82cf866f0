"""Fast R-CNN on given proposals: all-off equals torchvision's RoIHeads; components switch; the
dataset carries and flips proposals; libra's RPN proposals equal torchvision's RPN's."""
import copy

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import resize_boxes

from detectors import build_detector
from detectors.bfp import BackboneWithBFP
from detectors.config import ConfigError, TrainConfig
from detectors.fast_rcnn import FastRCNN
from detectors.propose import rpn_proposals
from detectors.roi_heads import LibraRoIHeads, random_draw

from tests.detectors.test_model import TINY, batch, detector_cfg


def proposals_for(images, num: int = 40, seed: int = 1):
    """Random boxes inside each image, [num, 4] xyxy in the image's own pixels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for img in images:
        h, w = img.shape[-2:]
        xy = torch.rand(num, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(num, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 2
        out.append(torch.cat([xy, (xy + wh).clamp(max=torch.tensor([float(w), float(h)]))], dim=1))
    return out


def fast_cfg(sampling=False, bfp=False, bl1=False, **extra):
    return detector_cfg(sampling, bfp, bl1, arch="fast_rcnn", **extra)


def with_proposals(targets, proposals):
    return [dict(t, proposals=p) for t, p in zip(targets, proposals)]


def test_all_switches_off_equals_torchvision_roi_heads_on_the_same_proposals():
    torch.manual_seed(0)
    ours = build_detector(fast_cfg())
    assert type(ours) is FastRCNN and type(ours.roi_heads) is LibraRoIHeads
    assert not hasattr(ours, "rpn")
    cfg = fast_cfg()
    ref_heads = RoIHeads(
        copy.deepcopy(ours.roi_heads.box_roi_pool), copy.deepcopy(ours.roi_heads.box_head),
        copy.deepcopy(ours.roi_heads.box_predictor),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=cfg.roi_batch_size_per_image,
        positive_fraction=0.25, bbox_reg_weights=None, score_thresh=cfg.box_score_thresh,
        nms_thresh=cfg.box_nms_thresh, detections_per_img=cfg.box_detections_per_img)
    images, targets = batch()
    proposals = proposals_for(images)

    def reference(train: bool):
        """torchvision: our transform and backbone, then its own RoIHeads on the proposals."""
        ours.train(train), ref_heads.train(train)
        image_list, ref_targets = ours.transform(images, copy.deepcopy(targets) if train else None)
        scaled = [resize_boxes(p[:ours.num_proposals["training" if train else "testing"]],
                               img.shape[-2:], size)
                  for p, img, size in zip(proposals, images, image_list.image_sizes)]
        features = ours.backbone(image_list.tensors)
        detections, losses = ref_heads(features, scaled, image_list.image_sizes, ref_targets)
        return losses if train else ours.transform.postprocess(
            detections, image_list.image_sizes, [img.shape[-2:] for img in images])

    torch.manual_seed(123)
    ours.train()
    our_losses = ours(images, with_proposals(targets, proposals))
    torch.manual_seed(123)
    ref_losses = reference(True)
    assert set(our_losses) == set(ref_losses) == {"loss_classifier", "loss_box_reg"}
    for name in ref_losses:
        torch.testing.assert_close(our_losses[name], ref_losses[name], rtol=0, atol=0, msg=name)
    assert our_losses["loss_box_reg"] > 0  # the gt boxes joined the proposals: positives exist

    ours.eval()
    with torch.no_grad():
        ours_out = ours(images, proposals=proposals)
        ref_out = reference(False)
    assert any(len(o["boxes"]) for o in ours_out)
    for a, b in zip(ours_out, ref_out):
        for key in ("boxes", "labels", "scores"):
            torch.testing.assert_close(a[key], b[key])


def test_fast_rcnn_has_faster_rcnns_parameters_less_the_rpn():
    torch.manual_seed(0)
    faster = build_detector(detector_cfg(True, True, True)).state_dict()
    fast = build_detector(fast_cfg(True, True, True)).state_dict()
    assert set(fast) == {k for k in faster if not k.startswith("rpn.")}
    assert all(fast[k].shape == faster[k].shape for k in fast)


@pytest.mark.parametrize("sampling,bfp,bl1", [(False, False, False), (True, True, True), (True, False, True)])
def test_components_switch_as_for_faster_rcnn(sampling, bfp, bl1):
    torch.manual_seed(0)
    model = build_detector(fast_cfg(sampling, bfp, bl1))
    assert isinstance(model.backbone, BackboneWithBFP) == bfp
    assert (model.roi_heads.sampler.neg_draw is not random_draw) == sampling
    images, targets = batch()
    proposals = proposals_for(images)
    losses = model.train()(images, with_proposals(targets, proposals))
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # every part trains
    with torch.no_grad():
        outputs = model.eval()(images, proposals=proposals)
    assert [set(o) for o in outputs] == [{"boxes", "labels", "scores"}] * 2


def test_gt_as_proposals_key():
    """With proposals far from every box, only the ground truths added as proposals are
    positives: the box loss is zero without them (add_gt_as_proposals: false)."""
    torch.manual_seed(0)
    images, targets = batch()
    far = [torch.tensor([[0.0, 80.0, 4.0, 84.0]] * 10) for _ in images]  # no IoU with any gt
    losses = {}
    for add in (True, False):
        model = build_detector(fast_cfg(add_gt_as_proposals=add)).train()
        losses[add] = model(images, with_proposals(targets, far))
    assert losses[True]["loss_box_reg"] > 0
    assert losses[False]["loss_box_reg"] == 0


def test_keeps_the_best_n_proposals_per_mode():
    model = build_detector(fast_cfg(rpn_post_nms_top_n_train=7, rpn_post_nms_top_n_test=3))
    seen = []
    model.roi_heads.register_forward_pre_hook(lambda m, args: seen.append([len(p) for p in args[1]]))
    images, targets = batch()
    proposals = proposals_for(images)
    model.train()(images, with_proposals(targets, proposals))
    with torch.no_grad():
        model.eval()(images, proposals=proposals)
    assert seen == [[7, 7], [3, 3]]


def test_missing_proposals_is_a_clear_error():
    model = build_detector(fast_cfg()).eval()
    images, _ = batch()
    with pytest.raises(ValueError, match="needs proposals"):
        model(images)


def test_proposals_only_with_fast_rcnn():
    with pytest.raises(ConfigError, match="data.proposals is set but detector.arch is faster_rcnn"):
        TrainConfig.from_dict({"detector": dict(TINY), "data": {"proposals": "/x"}})


def test_libra_rpn_proposals_are_torchvisions_rpn_output():
    """rpn_proposals runs the RPN's parts to keep the scores; its boxes must be the boxes the
    eval-mode RPN itself returns (mapped back to the input image's pixels)."""
    torch.manual_seed(0)
    model = build_detector(detector_cfg(False, True, False)).eval()
    images, _ = batch()
    with torch.no_grad():
        ours = rpn_proposals(model, images, pre_nms_top_n=60, post_nms_top_n=25)
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        boxes, _ = model.rpn(image_list, features)  # the same counts, set by rpn_proposals
    for (our_boxes, scores), ref, img, size in zip(ours, boxes, images, image_list.image_sizes):
        assert len(our_boxes) == len(ref) <= 25
        assert (scores[:-1] >= scores[1:]).all() and ((scores >= 0) & (scores <= 1)).all()
        torch.testing.assert_close(our_boxes, resize_boxes(ref, size, img.shape[-2:]))
