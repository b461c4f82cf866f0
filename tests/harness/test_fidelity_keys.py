"""Issue 11's fidelity keys travel through study files: into trial params, not mistaken for paths."""
from __future__ import annotations

import yaml

from harness.spec import config_keys, flatten, load_study

FIDELITY_KEYS = (
    "detector.box_loss.type", "detector.box_loss.beta", "detector.box_loss.loss_weight",
    "detector.balanced_l1_loss.formulation",
    "detector.iou_balanced_sampling.bin_max", "detector.iou_balanced_sampling.zero_iou",
    "detector.backbone_norm", "detector.balanced_feature_pyramid.init", "detector.box_head_init",
    "detector.rpn_neg_pos_ub", "detector.rpn_allowed_border", "data.skip_images_without_boxes",
    "schedule.eval_batch_size", "detector.retinanet_box_loss", "detector.retinanet_box_loss_norm",
    "detector.retinanet_p7_relu",
)


def test_fidelity_keys_are_recorded_with_the_trial_params(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s",
        "detector": {"box_loss": {"type": "l1", "loss_weight": 2.0}, "box_head_init": "reference"},
        "grid": {"detector.iou_balanced_sampling.bin_max": [None, 1.0]}}))
    trials = load_study(str(path)).trials()
    params = [flatten(t.config.to_dict()) for t in trials]  # what tracking logs as MLflow params
    for key in FIDELITY_KEYS:
        assert key in config_keys()
        assert all(key in p for p in params), key
    assert [p["detector.iou_balanced_sampling.bin_max"] for p in params] == [None, 1.0]
    assert params[0]["detector.box_loss.type"] == "l1" and params[0]["detector.box_loss.loss_weight"] == 2.0


def test_imagenet_weight_names_are_not_made_into_paths(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "grid": {"detector.pretrained": ["imagenet", "imagenet_v1",
                                                                                 "imagenet_v2", "w.pth"]}}))
    got = [t.config.detector.pretrained for t in load_study(str(path)).trials()]
    assert got == ["imagenet", "imagenet_v1", "imagenet_v2", str(tmp_path / "w.pth")]


import os  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_STUDIES = ["paper_table2_components", "paper_table4_num_bins", "paper_table5_bfp_refine",
                 "paper_table6_alpha_gamma", "retinanet_ablation_coco"]


@pytest.mark.parametrize("name", PAPER_STUDIES)
def test_paper_studies_select_the_reference(name):
    for trial in load_study(os.path.join(ROOT, "studies", f"{name}.yaml")).trials():
        cfg = trial.config
        d, s = cfg.detector, cfg.schedule
        assert (d.pretrained, d.backbone_norm, d.trainable_backbone_layers) == ("imagenet_v1", "frozen_stats", 3)
        assert d.balanced_feature_pyramid.init == "xavier" and d.balanced_l1_loss.formulation == "reference"
        assert (s.amp, s.evaluation_batch_size, cfg.data.skip_images_without_boxes) == (False, 1, True)
        if d.arch == "retinanet":
            assert (d.retinanet_box_loss, d.retinanet_smooth_l1_beta) == ("smooth_l1", 0.11)
            assert (d.retinanet_box_loss_norm, d.retinanet_p7_relu) == ("batch", False)
        if d.arch != "retinanet":  # the paper's protocol: Fast R-CNN on one set of proposals
            assert d.arch == "fast_rcnn" and load_study(os.path.join(ROOT, "studies", f"{name}.yaml")).spec.proposals
            assert d.add_gt_as_proposals
            assert (d.rpn_pre_nms_top_n_test, d.rpn_post_nms_top_n_test) == (2000, 2000)
            assert (d.rpn_neg_pos_ub, d.rpn_allowed_border, d.box_head_init) == (5, -1, "reference")
            sampler = d.iou_balanced_sampling
            assert (sampler.instance_balanced_pos, sampler.bin_max, sampler.zero_iou) == (True, 1.0, "in_bins")
            if not d.balanced_l1_loss.enabled and name != "paper_table6_alpha_gamma":
                assert (d.rcnn_box_loss, d.box_loss.beta, d.box_loss.loss_weight) == ("smooth_l1", 1.0, 1.0)
