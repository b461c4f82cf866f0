"""Fast R-CNN on pre-computed proposals against end-to-end Faster R-CNN: step time and mAP.

In one process, on one configuration (default configs/cpu_small.yaml):

1. end to end: `fit` the Faster R-CNN for --epochs; its bbox mAP; its checkpoint;
2. proposals: that checkpoint's RPN over the train and val sets (harness.proposals_stage.produce);
3. Fast R-CNN: `fit` the same configuration with detector.arch fast_rcnn on those proposals for
   the same epochs; its bbox mAP;
4. the training step, side by side: fresh models of the variants below take turns on the same
   batches (the order rotated every round, so load from other work on the machine falls on all
   alike), each step `detectors.engine.train_step` (what fit runs); medians over rounds and
   the per-round ratios to end to end (median, IQR). An identical end-to-end copy ("A/A")
   measures the noise floor. Variants:
     e2e            the Faster R-CNN step
     e2e (A/A)      a second copy of it
     fast           the Fast R-CNN step (no RPN), its proposal count from the config
     fast, N/2      the same with half the proposals per image (is the count what costs?)
     backbone only  backbone + FPN (+ BFP) forward and backward of a dummy loss on its maps:
                    the floor any second-stage-only protocol pays while the backbone trains
5. where an end-to-end forward goes, from forward hooks on backbone, rpn and roi_heads.

    PYTHONPATH=. python scripts/bench_fast_rcnn.py --epochs 4 --rounds 20 --out results/bench/fast-rcnn-cpu.md

Image batches: the config's (schedule.batch_size images, drawn from its train set, flipped as
in training); threads: schedule.num_threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import yaml

from detectors import build_detector
from detectors.config import TrainConfig
from detectors.data.loader import build_datasets, collate_detection
from detectors.engine import fit, seed_everything, train_step
from harness.proposals_stage import produce


def load_config(path: str, epochs: int) -> TrainConfig:
    with open(path) as f:
        mapping = yaml.safe_load(f)
    sched = mapping.setdefault("schedule", {})
    sched["epochs"] = epochs
    # keep the config's decay, moved inside the shorter schedule
    sched["lr_steps"] = [s for s in sched.get("lr_steps", []) if s < epochs] or [max(1, epochs - 1)]
    sched.setdefault("device", "cpu")
    cfg = TrainConfig.from_dict(mapping)
    return dataclasses.replace(cfg, data=cfg.data.resolved(os.path.dirname(os.path.abspath(path))))


def as_fast(cfg: TrainConfig, proposals: str, **detector_changes) -> TrainConfig:
    return dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, arch="fast_rcnn", **detector_changes),
                               data=dataclasses.replace(cfg.data, proposals=proposals))


class Stepper:
    """One variant's model and optimizer; `step(images, targets)` -> seconds of one train_step."""

    def __init__(self, cfg: TrainConfig, backbone_only: bool = False):
        seed_everything(cfg.schedule.seed)
        self.model = build_detector(cfg.detector).train()
        self.backbone_only = backbone_only
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)  # small: keep the models sane
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.grad_clip = cfg.schedule.grad_clip

    def step(self, images, targets) -> float:
        start = time.perf_counter()
        if self.backbone_only:
            image_list, _ = self.model.transform(images, [dict(t) for t in targets])
            features = self.model.backbone(image_list.tensors)
            loss = sum(f.float().mean() for f in features.values())
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            train_step(self.model, self.optimizer, self.scaler, images, targets, grad_clip=self.grad_clip)
        return time.perf_counter() - start


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def forward_breakdown(cfg: TrainConfig, batches, rounds: int) -> dict[str, float]:
    """Median seconds per end-to-end training forward in backbone, rpn, roi_heads (hooks)."""
    seed_everything(cfg.schedule.seed)
    model = build_detector(cfg.detector).train()
    spent: dict[str, list[float]] = {"backbone": [], "rpn": [], "roi_heads": []}
    marks: dict[str, float] = {}
    for name in spent:
        module = getattr(model, name)
        module.register_forward_pre_hook(lambda m, a, name=name: marks.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda m, a, o, name=name: spent[name].append(time.perf_counter() - marks[name]))
    totals = []
    for i in range(rounds):
        images, targets = batches[i % len(batches)]
        start = time.perf_counter()
        losses = model(images, targets)
        totals.append(time.perf_counter() - start)
        del losses
    out = {name: statistics.median(v) for name, v in spent.items()}
    out["forward"] = statistics.median(totals)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cpu_small.yaml")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of the side-by-side steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one); "
                        "runs already finished there are reused, not retrained")
    parser.add_argument("--skip-fit", action="store_true", help="time the steps only (proposals still produced)")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args = parser.parse_args()

    started = time.time()
    cfg = load_config(args.config, args.epochs)
    if cfg.schedule.num_threads:
        torch.set_num_threads(cfg.schedule.num_threads)
    work = args.work or tempfile.mkdtemp(prefix="bench-fast-rcnn-")
    lines = [f"# Fast R-CNN on pre-computed proposals vs end-to-end Faster R-CNN ({os.path.basename(args.config)})", ""]
    say = lambda text="": (print(text, flush=True), lines.append(text))  # noqa: E731

    # 1-3: the two protocols trained for the same epochs ------------------------------------
    e2e_dir, prop_dir, fast_dir = (os.path.join(work, n) for n in ("e2e", "proposals", "fast"))
    if args.skip_fit:
        e2e_cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, epochs=1, max_iters_per_epoch=2))
        fit(e2e_cfg, e2e_dir, progress=False)
        e2e_map = fast_map = None
    else:
        e2e = fit(cfg, e2e_dir, progress=False)
        e2e_map = e2e["final"]["bbox_mAP"]
        print(f"end to end: bbox_mAP {e2e_map:.4f} after {args.epochs} epochs", flush=True)
    if not os.path.isfile(os.path.join(prop_dir, "manifest.json")):
        produce(cfg, os.path.join(e2e_dir, "checkpoint.pt"), prop_dir, device="cpu", batch_size=cfg.schedule.batch_size)
    fast_cfg = as_fast(cfg, prop_dir)
    if not args.skip_fit:
        fast = fit(fast_cfg, fast_dir, progress=False)
        fast_map = fast["final"]["bbox_mAP"]
        print(f"fast: bbox_mAP {fast_map:.4f} after {args.epochs} epochs", flush=True)

    # 4: the steps side by side ------------------------------------------------------------
    train_set, _ = build_datasets(fast_cfg.data)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_set), generator=g).tolist()
    bs = cfg.schedule.batch_size
    batches = [collate_detection([train_set[j] for j in order[i:i + bs]])
               for i in range(0, bs * (args.rounds + args.warmup), bs) if i + bs <= len(order)]
    n_train = cfg.detector.rpn_post_nms_top_n_train
    variants = {
        "e2e": Stepper(cfg),
        "e2e (A/A)": Stepper(cfg),
        "fast": Stepper(fast_cfg),
        f"fast, {n_train // 2} proposals": Stepper(as_fast(cfg, prop_dir, rpn_post_nms_top_n_train=max(1, n_train // 2))),
        "backbone only": Stepper(cfg, backbone_only=True),
    }
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        images, targets = batches[r % len(batches)]
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = variants[name].step(images, [dict(t) for t in targets])
            if r >= args.warmup:
                times[name].append(seconds)
    breakdown = forward_breakdown(cfg, batches, max(5, args.rounds // 2))

    det = cfg.detector
    say(f"Configuration: `{args.config}` ({det.backbone} backbone, {det.min_size} px, FPN {det.fpn_channels} ch, "
        f"BFP {'on' if det.balanced_feature_pyramid.enabled else 'off'}, {det.roi_batch_size_per_image} RoIs/image, "
        f"MLP {det.representation_size}, {det.rpn_post_nms_top_n_train} proposals/image in training, "
        f"batch {bs}, {cfg.schedule.num_threads or torch.get_num_threads()} thread(s)).")
    say(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), "
        f"no GPU; Python {platform.python_version()}, torch {torch.__version__}.")
    say(f"Command: `PYTHONPATH=. python scripts/bench_fast_rcnn.py {' '.join(sys.argv[1:])}` "
        f"({time.time() - started:.0f} s).")
    say("")
    say(f"## Training step, side by side ({args.rounds} rounds after {args.warmup} warm-up, order rotated)")
    say("")
    say("| variant | median s/step | fastest s/step | ratio to e2e: median [IQR] of per-round ratios | ratio of the fastest steps |")
    say("|---|--:|--:|--:|--:|")
    for name in names:
        ratios = [t / e for t, e in zip(times[name], times["e2e"])]
        lo, med, hi = quartiles(ratios)
        say(f"| {name} | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} | "
            f"{med:.3f}x [{lo:.3f}, {hi:.3f}] | {min(times[name]) / min(times['e2e']):.3f}x |")
    say("")
    say("The fastest step of each variant is the one least disturbed by other work on the machine;")
    say("the A/A row is the noise floor of both columns.")
    say("")
    say("## Where an end-to-end training forward goes (median s, forward hooks)")
    say("")
    say("| part | s | share of the forward |")
    say("|---|--:|--:|")
    for name in ("backbone", "rpn", "roi_heads"):
        say(f"| {name} | {breakdown[name]:.4f} | {breakdown[name] / breakdown['forward']:.0%} |")
    say(f"| whole forward | {breakdown['forward']:.4f} | 100% |")
    if e2e_map is not None:
        say("")
        say(f"## bbox mAP after {args.epochs} epochs (pycocotools, the config's val set)")
        say("")
        say("| protocol | bbox mAP |")
        say("|---|--:|")
        say(f"| end to end (Faster R-CNN) | {e2e_map:.4f} |")
        say(f"| Fast R-CNN on that model's RPN proposals | {fast_map:.4f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
