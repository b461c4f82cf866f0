"""Tests of the benchmark: tiny models at 64x96 px, a few rounds, small COCOeval sets."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from detectors.config import DetectorConfig
from detectors.sampling import iou_balanced_neg_sample
from harness import bench
from harness.cli import main

TINY = DetectorConfig(
    backbone="tiny", num_classes=3, min_size=64, max_size=96, fpn_channels=16,
    rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
    roi_batch_size_per_image=32, representation_size=32,
)
TINY_SETTINGS = bench.ModelBenchSettings(
    image_height=64, image_width=96, batch_size=2, iters=2, warmup=1, memory="off"
)


# ------------------------------------------------------------------------------------ model
def test_component_variants_change_only_the_switches():
    variants = bench.component_variants(TINY)
    assert list(variants) == list(bench.VARIANTS)
    for name, cfg in variants.items():
        assert tuple(cfg.component_flags.values()) == bench.VARIANTS[name]
        # Everything else, including each component's own settings, comes from the base.
        assert dataclasses.replace(
            cfg,
            iou_balanced_sampling=TINY.iou_balanced_sampling,
            balanced_feature_pyramid=TINY.balanced_feature_pyramid,
            balanced_l1_loss=TINY.balanced_l1_loss,
        ) == TINY


def test_synthetic_batch_is_valid_and_reproducible():
    images, targets = bench.synthetic_batch(batch_size=2, image_height=64, image_width=96, num_classes=3, seed=1)
    again, _ = bench.synthetic_batch(batch_size=2, image_height=64, image_width=96, num_classes=3, seed=1)
    assert torch.equal(images[0], again[0])
    for img, t in zip(images, targets):
        assert img.shape == (3, 64, 96)
        boxes = t["boxes"]
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= 96 and boxes[:, 3].max() <= 64
        assert t["labels"].min() >= 1 and t["labels"].max() <= 3


def test_model_bench_returns_every_variant_with_baseline_ratio_one():
    result = bench.run_model_bench(TINY, TINY_SETTINGS)
    rows = result.rows
    assert [r.variant for r in rows] == list(bench.VARIANTS) + [bench.CONTROL]
    assert len(result.rounds) == TINY_SETTINGS.iters * len(rows)
    for r in rows:
        assert r.train_step_s > 0 and r.infer_batch_s > 0 and r.infer_images_per_s > 0
        assert r.train_step_s_q25 <= r.train_step_s <= r.train_step_s_q75
        assert r.peak_memory_mb is None and r.memory_ratio is None  # memory="off"
        assert r.final_loss == r.final_loss  # not NaN
    baseline = rows[0]
    assert baseline.train_time_ratio == 1.0 and baseline.infer_throughput_ratio == 1.0
    assert baseline.train_time_ratio_q25 == baseline.train_time_ratio_q75 == 1.0
    libra = rows[4]
    assert (libra.iou_balanced_sampling, libra.balanced_feature_pyramid, libra.balanced_l1_loss) == (True, True, True)
    # The pyramid adds parameters; the sampler and the loss do not.
    assert rows[1].num_params == rows[3].num_params == baseline.num_params < rows[2].num_params
    metrics = bench.bench_metrics(rows)
    assert metrics["bench.baseline.train_time_ratio"] == 1.0
    assert "bench.libra_all_three.infer_throughput_ratio" in metrics
    # The control is the baseline again: same parameters, same switches.
    control = rows[-1]
    assert control.num_params == baseline.num_params and not control.iou_balanced_sampling


def test_model_bench_without_control_has_the_five_variants():
    rows = bench.run_model_bench(TINY, dataclasses.replace(TINY_SETTINGS, iters=1, warmup=0, control=False)).rows
    assert [r.variant for r in rows] == list(bench.VARIANTS)


@pytest.mark.slow
def test_cpu_memory_probe_reports_peak_above_idle():
    # One fresh process (imports torch): a few seconds.
    probe = bench.cpu_memory_probe(TINY, dataclasses.replace(TINY_SETTINGS, memory_steps=1))
    assert probe["peak_rss_mb"] >= probe["idle_rss_mb"] > 0


# ------------------------------------------------------------------------------------ sampler
def _bin_counts(max_ious: torch.Tensor, picked: torch.Tensor, num_bins: int) -> list[int]:
    width = max_ious.max() / num_bins
    bins = (max_ious[picked] / width).floor().clamp(0, num_bins - 1).long()
    return torch.bincount(bins, minlength=num_bins).tolist()


def _constructed_ious(num_middle: int, gen: torch.Generator) -> torch.Tensor:
    # Max 0.45 -> three bins of width 0.15: [0, .15), [.15, .30), [.30, .45]. Values stay clear
    # of the edges: 100 easy negatives, num_middle in the middle bin, 50 hard ones (the last 0.45).
    easy = 0.01 + 0.12 * torch.rand(100, generator=gen)
    middle = 0.17 + 0.1 * torch.rand(num_middle, generator=gen)
    hard = torch.cat([0.32 + 0.1 * torch.rand(49, generator=gen), torch.tensor([0.45])])
    values = torch.cat([easy, middle, hard])
    return values[torch.randperm(values.numel(), generator=gen)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loop_reference_and_vectorised_sampler_draw_the_same_per_bin_counts(seed):
    gen = torch.Generator().manual_seed(seed)
    plenty, scarce = _constructed_ious(20, gen), _constructed_ious(5, gen)
    for sample in (bench.iou_balanced_neg_sample_loop, iou_balanced_neg_sample):
        # Every bin can pay its quota: 30 // 3 = 10 from each, exactly.
        picked = sample(plenty, 30, num_bins=3, generator=gen)
        assert picked.numel() == 30 and torch.equal(picked, picked.unique())  # sorted, no repeats
        assert _bin_counts(plenty, picked, 3) == [10, 10, 10]
        # The middle bin holds 5 < 60 // 3: all 5 are taken, the other 55 come from the outer
        # bins (20 each, then 15 more at random from what is left).
        max_ious = scarce
        picked = sample(max_ious, 60, num_bins=3, generator=gen)
        assert picked.numel() == 60 and torch.equal(picked, picked.unique())
        easy, middle, hard = _bin_counts(max_ious, picked, 3)
        assert middle == 5 and easy >= 20 and hard >= 20 and easy + hard == 55


def test_loop_reference_returns_everything_when_asked_for_more():
    max_ious = torch.tensor([0.1, 0.2, 0.3])
    assert bench.iou_balanced_neg_sample_loop(max_ious, 5).tolist() == [0, 1, 2]


def test_realistic_negatives_and_sampler_bench():
    max_ious, num_expected = bench.realistic_negatives(num_proposals=300, rois_per_image=64, seed=0)
    assert (max_ious < 0.5).all() and (max_ious >= 0).all()
    assert 48 <= num_expected <= 64  # at most a quarter positives
    result = bench.run_sampler_bench(reps=3, warmup=1, num_proposals=300, rois_per_image=64,
                                     batch_size=2, train_step_s=0.5)
    assert result.vectorised_us > 0 and result.loop_us > 0 and result.random_us > 0
    # share = 2 images * t / 0.5 s, in percent
    assert result.share_of_step_pct == pytest.approx(100 * 2 * result.vectorised_us * 1e-6 / 0.5)


# ------------------------------------------------------------------------------------ cocoeval
def test_synthetic_eval_set_has_coco_val_shape():
    data = bench.synthetic_eval_set(50, seed=0)
    assert data.num_images == 50
    assert data.det_boxes.shape == (5000, 4)  # 100 detections per image
    assert 250 < data.gt_boxes.shape[0] < 480  # Poisson(7.3) per image
    assert set(data.gt_categories.tolist()) <= set(bench.COCO_CATEGORY_IDS)
    assert (data.gt_boxes[:, 2:] > 0).all() and (data.det_boxes[:, 2:] > 0).all()


def test_faster_coco_eval_gives_identical_stats():
    pytest.importorskip("faster_coco_eval")
    rows = bench.run_cocoeval_bench(40, repeats=1)
    assert [r.backend for r in rows] == ["pycocotools", "faster"]  # detectors.evaluation.BACKENDS' names
    reference, faster = rows
    # Equal up to float rounding (summation order); exactly equal on most sets.
    assert faster.max_abs_diff_vs_pycocotools < 1e-12
    assert faster.stats == pytest.approx(reference.stats, abs=1e-12) and 0.0 < reference.stats[0] < 1.0
    assert reference.speedup == 1.0 and faster.total_s > 0


def test_cocoeval_bench_without_faster_backend_runs_pycocotools_only():
    rows = bench.run_cocoeval_bench(10, backends=["pycocotools"])
    # Not "identical to pycocotools": the only row is pycocotools, compared with itself.
    assert [r.backend for r in rows] == ["pycocotools"]
    assert 0.0 < rows[0].stats[0] < 1.0 and rows[0].speedup == 1.0


# ------------------------------------------------------------------------------------ harness
def test_harness_cost_accounts_for_every_slot_second():
    # Two slots, 100 s of wall time: set-up 10 s, teardown 5 s, two trials side by side.
    # Trial a: opened at 10, launched -> result 50 s, of which fit 45 (eval 5), closed at 61.
    # Trial b: opened at 10, 60 s, fit 58 (eval 8), closed at 71.
    t0 = 1000.0
    trials = [
        bench.TrialTiming("a", "finished", t0 + 10, t0 + 61, wall_s=50, fit_s=45, eval_s=5),
        bench.TrialTiming("b", "finished", t0 + 10, t0 + 71, wall_s=60, fit_s=58, eval_s=8),
    ]
    cost = bench.harness_cost("s", trials, slots=2, process_start=t0, process_end=t0 + 100,
                              study_start=t0 + 10, study_end=t0 + 95)
    assert cost.train_s == 40 + 50 and cost.eval_s == 5 + 8
    assert cost.trial_overhead_s == 5 + 2 and cost.tracking_s == 1 + 1
    assert cost.ideal_s == (90 + 13) / 2 and cost.wall_over_ideal == pytest.approx(100 / 51.5)
    # 200 slot-seconds = 103 fit + 7 overhead + 2 tracking + 2 x (10 + 5) + idle
    assert cost.idle_slot_s == pytest.approx(200 - 103 - 7 - 2 - 30)
    assert sum(sec for _, sec in cost.breakdown()) == pytest.approx(200)


# ------------------------------------------------------------------------------------ CLI
TINY_CLI = ["bench", "--preset", "cpu-quickstart", "--what", "model,sampler,cocoeval", "--device", "cpu",
            "--backbone", "tiny",
            "--min-size", "64", "--max-size", "96", "--image-size", "64x96", "--batch", "1",
            "--iters", "2", "--warmup", "0", "--memory", "off", "--sampler-reps", "3",
            "--cocoeval-images", "10"]


def test_cli_writes_markdown_and_csv(tmp_path, capsys):
    assert main(TINY_CLI + ["--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cpu-quickstart-cpu-cocoeval.csv", "cpu-quickstart-cpu-rounds.csv",
                     "cpu-quickstart-cpu-sampler.csv", "cpu-quickstart-cpu.csv", "cpu-quickstart-cpu.md"]
    report = (tmp_path / "cpu-quickstart-cpu.md").read_text()
    for heading in ("## Machine and versions", "## Component costs against the baseline",
                    "## IoU-balanced sampler", "## COCO evaluation speed", "## Not measured here"):
        assert heading in report
    if not torch.cuda.is_available():
        assert "GPU figures (no GPU on this machine)" in report
    csv = (tmp_path / "cpu-quickstart-cpu.csv").read_text().splitlines()
    assert len(csv) == 1 + len(bench.VARIANTS) + 1  # and the A/A control
    assert "done in" in capsys.readouterr().out


def test_cli_cocoeval_only_names_the_file_after_the_set(tmp_path):
    assert main(["bench", "--what", "cocoeval", "--cocoeval-images", "10", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "cocoeval-10.md").is_file() and (tmp_path / "cocoeval-10-cocoeval.csv").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--what", "model,speed"], "--what"),
    (["--device", "cpu", "--amp"], "--amp needs a CUDA device"),
    (["--iters", "0"], "--iters must be at least 1"),
    (["--image-size", "big"], "--image-size"),
    (["--device", "tpu"], "--device"),
    (["--what", "harness", "--study", "no/such/study.yaml"], "no such file"),
])
def test_cli_bad_options_exit_2_with_one_line(extra, message, tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path)] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_without_gpu_exits_2(tmp_path, capsys):
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err
