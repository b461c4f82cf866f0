"""The benchmark wing (`libra bench`, bench studies): one module per part, each returning plain
records. model: the components' costs; sampler: the IoU-balanced sampler; cocoeval: the COCOeval
backends; harness_cost: a study's wall time taken apart; plan: what a run measures and `measure`;
render: the report and the machine it ran on; trial: a bench study's trial."""
import logging

# torch.utils.benchmark imports torch.utils.cpp_extension, which warns where no CUDA runtime is
# installed; nothing here compiles extensions, so that line is noise on every CPU machine.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from harness.bench.cocoeval import (COCO_CATEGORY_IDS, STAT_NAMES, CocoEvalResult,  # noqa: E402,F401
                                    SyntheticEvalSet, run_cocoeval_bench, synthetic_eval_set)
from harness.bench.harness_cost import HarnessCost, TrialTiming, harness_cost, run_harness_bench  # noqa: E402,F401
from harness.bench.model import (BASELINE, CONTROL, FIGURES, SAMPLER_VARIANT, ModelBenchResult,  # noqa: E402,F401
                                 ModelBenchSettings, all_on, bench_metrics, component_variants, cpu_memory_probe,
                                 run_model_bench, synthetic_batch, variant_result, variants)
from harness.bench.sampler import (SamplerResult, iou_balanced_neg_sample_loop,  # noqa: E402,F401
                                   realistic_negatives, run_sampler_bench)


def __getattr__(name: str):
    if name == "VARIANTS":  # derived from detectors.components on access
        return variants()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
