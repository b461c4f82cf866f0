"""Study files: read, validate and expand a study (a base config plus a grid or a search) into trials.

A study file is YAML::

    name: quickstart                      # experiment name in MLflow, study name in Optuna
    description: ...
    detector: {...}                       # the base trial config, exactly what
    data: {...}                           #   detectors.config.TrainConfig.from_dict reads;
    schedule: {...}                       #   relative data paths are relative to the study file
    grid:                                 # EITHER a grid: the product of every axis ...
      detector.balanced_l1_loss.enabled: [false, true]
      cases:                              #   ... where `cases` is one axis of zipped settings
        - {detector.balanced_l1_loss.alpha: 0.2, detector.balanced_l1_loss.gamma: 1.0}
        - {detector.balanced_l1_loss.alpha: 0.5, detector.balanced_l1_loss.gamma: 1.5}
    search:                               # OR an Optuna search
      space:
        detector.balanced_l1_loss.alpha: {type: float, low: 0.1, high: 1.0, log: true}
        detector.iou_balanced_sampling.num_bins: {type: int, low: 2, high: 6}
        detector.balanced_feature_pyramid.refine_type: {type: categorical, choices: [conv, non_local]}
      num_trials: 20
      metric: bbox_mAP                    # the final epoch's value is the objective;
      direction: maximize                 #   evaluated epochs' values feed the pruner
      sampler: tpe                        # tpe | random | cmaes | grid, or {name: tpe, seed: 0, startup_trials: 10}
      pruner: median                      # median | hyperband | none, or {name: median, startup_trials: 3, warmup_epochs: 1}
      first_trials:                       # evaluated before the sampler proposes anything
        - {detector.balanced_l1_loss.alpha: 0.5, detector.iou_balanced_sampling.num_bins: 3}
    bench:                                # OR the component-cost benchmark (`libra bench`) as one
      iters: 20                           #   trial: timed rounds, untimed warm-up rounds, images per
      warmup: 5                           #   step (default schedule.batch_size), AMP (needs a GPU),
      batch: 2                            #   parts to measure (model, sampler); image size: the
      amp: false                          #   synthetic set's, else min_size x max_size
      what: [model, sampler]
    seeds: [0, 1]                         # schedule.seed of each grid point (a search or bench takes one)
                                          #   or, for a grid, rounds: {initial: 2, max: 8,
                                          #   until_half_width: 1.0} adds a seed per round until
                                          #   every main effect's 95% half-width <= 1.0 AP
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0, concurrency: 2}
    tracking: {uri: null, experiment: null, optuna_storage: null}
    max_retries: 1                        # extra attempts for a trial that raises or goes NaN
    reference:                            # optional: published numbers, for reports
      - {label: baseline, match: {detector.balanced_l1_loss.enabled: false}, metrics: {bbox_mAP: 0.359}}
    analysis: {target_effect: 0.3}        # optional: the effect size (AP points) the seeds planner
                                          #   sizes the study for (harness/planner.py)

Every mistake is a `SpecError` (a UserError) whose message is one line naming the file and the
dotted key. Each trial gets a stable `trial_key`: a hash of its full config and resources, the
identity that resume uses in MLflow, Optuna and the work dir.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from detectors.components import components
from detectors.config import (
    IMAGENET_PRETRAINED,
    MAX_SEED,
    ConfigError,
    TrainConfig,
    check_dotted_key,
    config_keys,
    type_word,
    unwrap_optional,
)
from harness.errors import UserError
from harness.yaml_io import load_yaml_file

# What the engine reports per epoch; a search's metric and a reference row's metrics are among these.
EVAL_METRICS = (
    "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
    "bbox_AR_1", "bbox_AR_10", "bbox_AR_100",
)
TRAIN_METRICS = (
    "loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
    "loss_classification", "loss_bbox_regression", "lr", "sec_per_iter", "train_images_per_sec",
    "peak_memory_mb", "epoch_seconds", "eval_seconds", "eval_images_per_sec",
)
CASES = "cases"  # the grid's one reserved key: an axis whose values are mappings set together


class SpecError(UserError):
    """A study file is wrong; the message is one line: `FILE: KEY: what is wrong`."""


# --------------------------------------------------------------------------------------------
# The file's structure (pydantic): strict types, no unknown keys.
# --------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SpaceDim(_Strict):
    """One dimension of a search space: a float or int range, or a list of choices."""

    type: Literal["float", "int", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _consistent(self) -> "SpaceDim":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty `choices` list")
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("a categorical dimension takes only `choices`")
            for choice in self.choices:
                if not isinstance(choice, (bool, int, float, str, type(None))):
                    raise ValueError(f"choices must be scalars (Optuna's rule), got {choice!r}")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} dimension takes low/high, not `choices`")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} dimension needs both `low` and `high`")
        if self.type == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and value != int(value):
                    raise ValueError(f"`{name}` of an int dimension must be an integer, got {value}")
        if not self.low < self.high:
            raise ValueError(f"`low` must be below `high`, got {self.low} and {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log dimension needs `low` > 0")
        if self.log and self.step is not None:
            raise ValueError("`log` and `step` cannot be combined (Optuna's rule)")
        if self.step is not None and self.step <= 0:
            raise ValueError("`step` must be > 0")
        return self

    def grid_values(self) -> list[Any]:
        """Every value of the dimension, for the grid sampler; only finite dimensions have them."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ValueError("a float dimension needs `step` for the grid sampler")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and value != int(value):
            return False
        return self.low <= value <= self.high

    def endpoints(self) -> list[Any]:
        """The values that bound the dimension (checked against the config's own rules)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


class SamplerSpec(_Strict):
    name: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    seed: Optional[int] = None  # makes the sampler's proposals reproducible
    startup_trials: int = Field(default=10, ge=0)  # random proposals before TPE/CMA-ES model the space


class PrunerSpec(_Strict):
    name: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(default=3, ge=0)  # median: trials that finish before any is pruned
    warmup_epochs: int = Field(default=1, ge=0)  # median: epochs of a trial never pruned


class SearchSpec(_Strict):
    space: dict[str, SpaceDim]
    num_trials: int = Field(ge=1)
    metric: str = "bbox_mAP"
    direction: Literal["maximize", "minimize"] = "maximize"
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    first_trials: list[dict[str, Any]] = []

    @field_validator("sampler", "pruner", mode="before")
    @classmethod
    def _by_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in EVAL_METRICS + TRAIN_METRICS:
            raise ValueError(f"unknown metric {value!r}; the engine reports {', '.join(EVAL_METRICS)}")
        return value

    @field_validator("space")
    @classmethod
    def _not_empty(cls, value: dict) -> dict:
        if not value:
            raise ValueError("the search space is empty; name at least one dotted key with a range")
        return value


class BenchSpec(_Strict):
    """The `bench:` block: `libra bench`'s model and sampler measurements as one tracked trial."""

    iters: int = Field(default=20, ge=1)  # timed rounds (each variant: one train step + one inference batch)
    warmup: int = Field(default=5, ge=0)  # untimed rounds first
    batch: Optional[int] = Field(default=None, ge=1)  # images per step; None: schedule.batch_size
    amp: bool = False  # float16 autocast + GradScaler; needs a GPU
    what: list[Literal["model", "sampler"]] = ["model", "sampler"]
    image_size: Optional[list[int]] = None  # [H, W]; None: the synthetic set's side, else min/max size
    memory: Literal["auto", "off"] = "auto"  # auto: CUDA allocator / a fresh process per variant on CPU
    sampler_reps: int = Field(default=300, ge=1)

    @field_validator("what")
    @classmethod
    def _parts(cls, value: list) -> list:
        if not value:
            raise ValueError("empty; name at least one of model, sampler")
        if len(set(value)) != len(value):
            raise ValueError(f"repeats a part: {value}")
        return value

    @field_validator("image_size")
    @classmethod
    def _hw(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and (len(value) != 2 or min(value) < 32):
            raise ValueError(f"[HEIGHT, WIDTH], both at least 32, got {value}")
        return value


class Resources(_Strict):
    workers: int = Field(default=1, ge=1)  # processes per trial; > 1 runs DDP through Ray Train
    cpus_per_worker: int = Field(default=1, ge=1)  # also each worker's torch thread count
    gpus_per_worker: float = Field(default=0, ge=0)
    concurrency: Optional[int] = Field(default=None, ge=1)  # trials at once; None: as many as fit

    @property
    def gpus_per_trial(self) -> float:
        return self.workers * self.gpus_per_worker

    @property
    def cpus_per_trial(self) -> int:
        return self.workers * self.cpus_per_worker

    def describe(self) -> str:
        gpus = f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        mode = "DDP" if self.workers > 1 else "single process"
        return f"{self.workers} worker(s) x ({self.cpus_per_worker} CPU{gpus}), {mode}"


class Tracking(_Strict):
    uri: Optional[str] = None  # MLflow tracking URI; default sqlite under the work dir
    experiment: Optional[str] = None  # MLflow experiment; default the study name
    optuna_storage: Optional[str] = None  # Optuna RDB URL; default a journal file under the work dir


class ReferenceRow(_Strict):
    """A published result: the trials whose params match `match` are compared against `metrics`.

    Metrics are fractions as COCOeval reports them (the paper's 35.9 AP is 0.359).
    """

    label: str
    match: dict[str, Any]
    metrics: dict[str, float]
    source: str = ""

    @field_validator("metrics")
    @classmethod
    def _known(cls, value: dict) -> dict:
        for name in value:
            if name not in EVAL_METRICS + TRAIN_METRICS:
                raise ValueError(f"unknown metric {name!r}; use {', '.join(EVAL_METRICS)}")
        return value


class Analysis(_Strict):
    """How the report judges the study's effects (harness/effects.py, harness/planner.py)."""

    target_effect: Optional[float] = Field(default=None, gt=0)  # AP points the planner must resolve


class SeedRounds(_Strict):
    """`seeds: {initial: 2, max: 8, until_half_width: 1.0}`: run the grid with seeds
    first .. first + initial - 1, then add one seed to every configuration per round until every
    main effect's 95% interval half-width (harness/effects.py, AP points) is at most
    until_half_width or the study has `max` seeds."""

    initial: int = Field(default=2, ge=1)
    max: int = Field(ge=1)
    until_half_width: float = Field(gt=0)
    first: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "SeedRounds":
        if self.max < self.initial:
            raise ValueError(f"max ({self.max}) must be >= initial ({self.initial})")
        if self.first + self.max - 1 > MAX_SEED:
            raise ValueError(f"seeds would run past {MAX_SEED}")
        return self

    def seeds(self, count: int) -> list[int]:
        return list(range(self.first, self.first + count))


class ProposalsStage(_Strict):
    """`proposals: {checkpoint: CKPT}`: the trials (detector.arch fast_rcnn) read proposals that
    `libra run` first produces from this Faster R-CNN checkpoint's RPN (harness/proposals_stage.py)
    over the data of `config` (a run config file; default: this study's own base), once."""

    checkpoint: str
    config: Optional[str] = None
    batch_size: int = Field(default=2, ge=1)


class StudySpec(_Strict):
    name: str
    description: str = ""
    detector: dict[str, Any] = {}
    data: dict[str, Any] = {}
    schedule: dict[str, Any] = {}
    grid: Optional[dict[str, Any]] = None
    search: Optional[SearchSpec] = None
    bench: Optional[BenchSpec] = None
    # A list, or a mapping of seed rounds; the discriminator picks the branch so an error
    # names the key inside it (seeds.rounds.max) rather than "not a list".
    seeds: Optional[Annotated[Union[Annotated[list[int], Tag("list")],
                                    Annotated[SeedRounds, Tag("rounds")]],
                              Discriminator(lambda v: "rounds" if isinstance(v, (dict, SeedRounds))
                                            else "list")]] = None
    resources: Resources = Resources()
    tracking: Tracking = Tracking()
    max_retries: int = Field(default=1, ge=0)
    reference: list[ReferenceRow] = []
    analysis: Analysis = Analysis()
    proposals: Optional[ProposalsStage] = None

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError(f"{value!r}: use letters, digits, '_', '.' and '-' (it names the "
                             "MLflow experiment and the Optuna study)")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("empty; give at least one seed or drop the key")
            if len(set(value)) != len(value):
                raise ValueError(f"repeats a seed: {value}")
            for seed in value:
                if not 0 <= seed <= MAX_SEED:
                    raise ValueError(f"each seed must be in [0, {MAX_SEED}], got {seed}")
        return value

    @model_validator(mode="after")
    def _one_plan(self) -> "StudySpec":
        if sum(x is not None for x in (self.grid, self.search, self.bench)) != 1:
            raise ValueError("give exactly one of `grid:` (an ablation), `search:` (an Optuna search) "
                             "or `bench:` (the component-cost benchmark)")
        return self


# --------------------------------------------------------------------------------------------
# Trials.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialPlan:
    """One trial: a full config to train, and what distinguishes it from its siblings."""

    key: str  # stable identity: hash of the config and the resources
    params: dict[str, Any]  # the dotted keys this trial sets on top of the base (grid point / sample)
    seed: int
    config: TrainConfig  # complete, data paths absolute, threads and device set from the resources
    label: str  # short human name, e.g. "+ibs -bfp +bl1 seed=0" or "alpha=0.5 gamma=1.5 seed=0"


@dataclass(frozen=True)
class Study:
    """A validated study file, ready to expand into trials."""

    path: str  # absolute path of the study file
    spec: StudySpec
    base: dict[str, Any]  # the base trial mapping {detector, data, schedule}
    mapping: dict[str, Any]  # the whole study after --set overrides (what the parent run records)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        if self.spec.bench is not None:
            return "bench"
        return "grid" if self.spec.grid is not None else "search"

    @property
    def seeds(self) -> list[int]:
        """The seeds this study's trials run now (with seed rounds: the first round's)."""
        if isinstance(self.spec.seeds, SeedRounds):
            return self.spec.seeds.seeds(self.spec.seeds.initial)
        if self.spec.seeds is not None:
            return list(self.spec.seeds)
        return [int(self.base.get("schedule", {}).get("seed", 0))]

    @property
    def seed_rounds(self) -> Optional[SeedRounds]:
        return self.spec.seeds if isinstance(self.spec.seeds, SeedRounds) else None

    def with_seeds(self, seeds: Sequence[int]) -> "Study":
        """The same study with a fixed list of seeds (a round of a seed-rounds study)."""
        return dataclasses.replace(self, spec=self.spec.model_copy(update={"seeds": list(seeds)}))

    @property
    def metric(self) -> str:
        if self.spec.bench is not None:
            return "bench_seconds"  # a bench trial's one number for Optuna: how long it measured
        return self.spec.search.metric if self.spec.search else "bbox_mAP"

    @property
    def direction(self) -> str:
        if self.spec.bench is not None:
            return "minimize"
        return self.spec.search.direction if self.spec.search else "maximize"

    @property
    def varied_keys(self) -> list[str]:
        """The dotted keys that differ between trials, in the file's order."""
        if self.spec.search is not None:
            return list(self.spec.search.space)
        if self.spec.bench is not None:
            return []
        keys: list[str] = []
        for key, values in self.spec.grid.items():
            for k in ([key] if key != CASES else [k for case in values for k in case]):
                if k not in keys:
                    keys.append(k)
        return keys

    def grid_points(self) -> list[dict[str, Any]]:
        """The grid's points (dotted key -> value), in the file's order, last axis fastest."""
        axes = []
        for key, values in self.spec.grid.items():
            axes.append([dict(case) for case in values] if key == CASES else [{key: v} for v in values])
        points = []
        for combo in itertools.product(*axes):
            point: dict[str, Any] = {}
            for part in combo:
                point.update(part)
            points.append(point)
        return points

    def trials(self) -> list[TrialPlan]:
        """A grid's trials: every point times every seed; a bench's one trial."""
        if self.spec.bench is not None:
            return [self.bench_trial()]
        if self.spec.grid is None:
            raise TypeError("a search's trials come from Optuna; use make_trial")
        return [self.make_trial(point, seed) for point in self.grid_points() for seed in self.seeds]

    def bench_trial(self) -> TrialPlan:
        """A bench study's one trial; its key also covers the bench options."""
        plan = self.make_trial({}, self.seeds[0])
        material = json.dumps({"trial": plan.key, "bench": self.spec.bench.model_dump()},
                              sort_keys=True, default=str)
        key = hashlib.sha1(material.encode()).hexdigest()[:12]
        return dataclasses.replace(plan, key=key, label="bench " + ",".join(self.spec.bench.what))

    def make_trial(self, params: Mapping[str, Any], seed: int) -> TrialPlan:
        """The trial that sets `params` (dotted keys) and `seed` on the base config.

        A grid may vary schedule.seed itself; its value then is the trial's seed.
        """
        seed = int(params.get("schedule.seed", seed))
        mapping = copy.deepcopy(self.base)
        for key, value in params.items():
            set_dotted(mapping, key, value)
        set_dotted(mapping, "schedule.seed", seed)
        cfg = TrainConfig.from_dict(mapping)
        cfg = self._placed(cfg)
        material = json.dumps(
            {"config": cfg.to_dict(), "workers": self.spec.resources.workers,
             "gpus_per_worker": self.spec.resources.gpus_per_worker},
            sort_keys=True, default=str,
        )
        key = hashlib.sha1(material.encode()).hexdigest()[:12]
        return TrialPlan(key=key, params=dict(params), seed=seed, config=cfg,
                         label=self._label(params, seed))

    def _placed(self, cfg: TrainConfig) -> TrainConfig:
        """Absolute paths (Ray workers change directory), and threads and device from the resources."""
        base_dir = os.path.dirname(self.path)
        detector = cfg.detector
        if detector.pretrained is not None and detector.pretrained not in IMAGENET_PRETRAINED and not os.path.isabs(detector.pretrained):
            detector = dataclasses.replace(
                detector, pretrained=os.path.abspath(os.path.join(base_dir, detector.pretrained)))
        schedule = cfg.schedule
        res = self.spec.resources
        if schedule.num_threads is None:
            schedule = dataclasses.replace(schedule, num_threads=res.cpus_per_worker)
        if schedule.device == "auto" and res.gpus_per_worker == 0:
            schedule = dataclasses.replace(schedule, device="cpu")
        return dataclasses.replace(cfg, detector=detector, data=cfg.data.resolved(base_dir),
                                   schedule=schedule)

    def _label(self, params: Mapping[str, Any], seed: int) -> str:
        short = short_names(self.varied_keys)
        codes = component_codes()
        parts = []
        for key, value in params.items():
            if key in codes and isinstance(value, bool):
                parts.append(("+" if value else "-") + codes[key])
            else:
                shown = f"{value:.4g}" if isinstance(value, float) else render_value(value)
                parts.append(f"{short.get(key, key)}={shown}")
        if len(self.seeds) > 1 or self.kind == "grid":
            parts.append(f"seed={seed}")
        return " ".join(parts)


def component_codes() -> dict[str, str]:
    """Labels write the switches compactly: "+ibs -bfp +bl1" (on, off, on); key -> code."""
    return {c.key: c.code for c in components()}


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix))
                       for other in keys):
                out[key] = suffix
                break
        else:
            out[key] = key
    return out


def render_value(value: Any) -> str:
    """A config value as text: JSON for numbers, bools, null and lists; strings bare."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


# --------------------------------------------------------------------------------------------
# Dotted keys: the schema is detectors.config's dataclasses (config_keys, check_dotted_key).
# --------------------------------------------------------------------------------------------
def set_dotted(mapping: dict, key: str, value: Any) -> None:
    """mapping["a"]["b"]["c"] = value for key "a.b.c", creating the nested mappings."""
    parts = key.split(".")
    node = mapping
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------------------------
# Loading: YAML -> overrides -> structure -> base config -> grid/search/reference semantics.
# --------------------------------------------------------------------------------------------
def parse_override(text: str, flag: str = "--set") -> tuple[str, Any]:
    """`key=value` from --set (or `flag`); the value is read as YAML (`true`, `0.5`, `[1, 2]`, `null`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"{flag} expects KEY=VALUE (e.g. schedule.epochs=2), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise UserError(f"{flag} {key}: value {raw!r} is not valid YAML ({_one_line(err)})") from None
    return key, value


def apply_override(mapping: dict, key: str, value: Any) -> None:
    """Set a dotted `key` in the study mapping.

    Grid axes and search dimensions are themselves dotted keys, so at each level the longest
    run of parts that already names a key wins; under `grid` and `search.space` a new key is
    taken whole (`grid.detector.min_size=[128, 160]` adds one axis).
    """
    parts = key.split(".")
    node = mapping
    path: list[str] = []
    i = 0
    while i < len(parts) - 1:
        if path in (["grid"], ["search", "space"]):
            dotted_rest = ".".join(parts[i:])
            existing = [k for k in node if isinstance(k, str)
                        and (dotted_rest == k or dotted_rest.startswith(k + "."))]
            if not existing:
                node[dotted_rest] = value
                return
            name = max(existing, key=len)
            i += len(name.split("."))
        else:
            name = parts[i]
            i += 1
        if i == len(parts):
            node[name] = value
            return
        child = node.get(name)
        if not isinstance(child, dict):
            child = {}
            node[name] = child
        node = child
        path.append(name)
    node[parts[-1]] = value


def load_study(path: str, overrides: Sequence[str] = (), flag: str = "--set") -> Study:
    """Read, override and validate a study file; raises SpecError (one line) on any mistake.

    `flag` is the option the overrides came from (`libra bench` has --study-set), for messages.
    """
    shown = path
    mapping = load_yaml_file(path, "study file")  # limits, duplicate keys: harness/yaml_io.py
    if not isinstance(mapping, dict):
        raise SpecError(f"{shown}: a study file is a mapping (name:, detector:, grid: ...), "
                        f"got {type(mapping).__name__}")
    for item in overrides:
        key, value = parse_override(item, flag)
        apply_override(mapping, key, value)
    return validate_study(mapping, os.path.abspath(path), shown)


def validate_study(mapping: dict, path: str, shown: Optional[str] = None) -> Study:
    """Validate a study mapping read from `path` (shown in messages as `shown`)."""
    shown = shown or path

    def fail(where: str, message: str) -> SpecError:
        return SpecError(f"{shown}: {where}: {message}" if where else f"{shown}: {message}")

    try:
        spec = StudySpec.model_validate(mapping)
    except ValidationError as err:
        where, message = _pydantic_line(err)
        raise fail(where, message) from None

    base = {name: copy.deepcopy(getattr(spec, name)) for name in ("detector", "data", "schedule")}
    base = {k: v for k, v in base.items() if v}
    try:
        base_cfg = TrainConfig.from_dict(base)
    except ConfigError as err:
        raise fail("", str(err)) from None

    study = Study(path=path, spec=spec, base=base, mapping=copy.deepcopy(mapping))
    _check_proposals(spec, base_cfg, fail)
    if spec.grid is not None:
        _check_grid(spec, base, fail)
    elif spec.search is not None:
        _check_search(spec, base, fail)
    else:
        _check_bench(spec, base_cfg, fail)
    for i, row in enumerate(spec.reference):
        for key in row.match:
            problem = check_dotted_key(key)
            if problem:
                raise fail(f"reference[{i}].match.{key}", problem)
    res = spec.resources
    if res.gpus_per_worker > 1 and res.gpus_per_worker != int(res.gpus_per_worker):
        raise fail("resources.gpus_per_worker", "above 1 it must be a whole number of GPUs")
    if res.workers > 1 and 0 < res.gpus_per_worker < 1:
        raise fail("resources.gpus_per_worker",
                   "DDP over several workers needs a whole GPU per worker (1 or more)")
    if isinstance(spec.seeds, SeedRounds) and spec.grid is None:
        raise fail("seeds", "seed rounds ({initial, max, until_half_width}) are for a grid; "
                            "a search or bench takes one seed")
    if spec.search is not None and spec.seeds is not None and len(spec.seeds) != 1:
        raise fail("seeds", "a search takes one seed (it compares configurations, not seeds)")
    if spec.resources.gpus_per_worker > 0 and base_cfg.schedule.device == "cpu":
        raise fail("resources.gpus_per_worker",
                   "GPUs requested but schedule.device is cpu; set one of them consistently")
    if spec.grid is not None:
        keys = [t.key for t in study.trials()]
        if len(set(keys)) != len(keys):
            raise fail("grid", "two grid points give the same trial; remove the duplicate values")
    return study


def _check_proposals(spec: StudySpec, cfg: TrainConfig, fail) -> None:
    """Fast R-CNN trials need proposals from somewhere, and only they can use them."""
    if spec.proposals is not None and cfg.data.proposals is not None:
        raise fail("proposals", "give either data.proposals (a folder) or proposals: {checkpoint: ...} "
                                "(produced by libra run), not both")
    if spec.proposals is not None and cfg.detector.arch != "fast_rcnn":
        raise fail("proposals", f"the trials are {cfg.detector.arch}, which make their own proposals; "
                                "set detector.arch: fast_rcnn, or remove proposals:")
    if cfg.detector.arch == "fast_rcnn" and spec.proposals is None and cfg.data.proposals is None:
        raise fail("detector.arch", "fast_rcnn trials need proposals: set data.proposals to a folder of "
                                    "`libra proposals`, or proposals: {checkpoint: CKPT} to produce it")


def _check_value(base: dict, key: str, value: Any) -> Optional[str]:
    mapping = copy.deepcopy(base)
    set_dotted(mapping, key, value)
    try:
        TrainConfig.from_dict(mapping)
    except ConfigError as err:
        return str(err)
    return None


def _check_grid(spec: StudySpec, base: dict, fail) -> None:
    grid = spec.grid
    if not grid:
        raise fail("grid", "the grid is empty; give at least one dotted key with a list of values")
    if "schedule.seed" in grid and spec.seeds is not None:
        raise fail("grid.schedule.seed", "set seeds with `seeds:` or in the grid, not both")
    axis_keys: set[str] = set()
    for key, values in grid.items():
        where = f"grid.{key}"
        if key == CASES:
            if not isinstance(values, list) or not values:
                raise fail(where, "a non-empty list of mappings (dotted key -> value), one per case")
            for i, case in enumerate(values):
                if not isinstance(case, dict) or not case:
                    raise fail(f"{where}[{i}]", "each case is a non-empty mapping of dotted keys to values")
                for ckey, cvalue in case.items():
                    problem = check_dotted_key(ckey) or _check_value(base, ckey, cvalue)
                    if problem:
                        raise fail(f"{where}[{i}].{ckey}", problem)
            continue
        problem = check_dotted_key(key)
        if problem:
            raise fail(where, problem)
        if not isinstance(values, list):
            raise fail(where, f"a grid axis is a list of values, got {values!r}; write [{render_value(values)}]")
        if not values:
            raise fail(where, "empty list of values; give at least one")
        seen: list[str] = []
        for i, value in enumerate(values):
            # Compare as text: YAML's true and 1 are equal in Python but are different settings.
            if render_value(value) in seen:
                raise fail(where, f"value {render_value(value)} appears twice")
            seen.append(render_value(value))
            problem = _check_value(base, key, value)
            if problem:
                raise fail(f"{where}[{i}]", problem)
        axis_keys.add(key)
    if CASES in grid:
        overlap = sorted(axis_keys & {k for case in grid[CASES] for k in case})
        if overlap:
            raise fail(f"grid.{overlap[0]}", "set both as an axis and inside cases; keep one")
    # The combinations must be valid too (e.g. RetinaNet with the sampler on).
    probe = Study(path="", spec=spec, base=base, mapping={})
    for point in probe.grid_points():
        mapping = copy.deepcopy(base)
        for key, value in point.items():
            set_dotted(mapping, key, value)
        try:
            TrainConfig.from_dict(mapping)
        except ConfigError as err:
            shown = ", ".join(f"{k}={render_value(v)}" for k, v in point.items())
            raise fail("grid", f"the point {{{shown}}} is invalid: {err}") from None


def _check_bench(spec: StudySpec, cfg: TrainConfig, fail) -> None:
    bench, res = spec.bench, spec.resources
    if cfg.detector.arch != "faster_rcnn":
        raise fail("detector.arch", f"the benchmark covers Faster R-CNN, got {cfg.detector.arch!r}")
    if res.workers != 1:
        raise fail("resources.workers", "a bench study runs in one process; set workers: 1")
    if bench.amp and res.gpus_per_worker == 0:
        raise fail("bench.amp", "AMP needs a GPU; set resources.gpus_per_worker or drop amp")
    if spec.seeds is not None and len(spec.seeds) != 1:
        raise fail("seeds", "a bench study takes one seed")
    if spec.reference:
        raise fail("reference", "a bench study has no table to compare against; drop `reference:`")


def _check_search(spec: StudySpec, base: dict, fail) -> None:
    search = spec.search
    keys = config_keys()
    for key, dim in search.space.items():
        where = f"search.space.{key}"
        problem = check_dotted_key(key)
        if problem:
            raise fail(where, problem)
        tp = unwrap_optional(keys[key])
        if dim.type == "float" and tp is not float:
            raise fail(where, f"a float range needs a number setting; {key} is {type_word(tp)}")
        if dim.type == "int" and tp not in (int, float):
            raise fail(where, f"an int range needs a number setting; {key} is {type_word(tp)}")
        for value in dim.endpoints():
            problem = _check_value(base, key, value)
            if problem:
                raise fail(where, f"the range reaches an invalid value: {problem}")
        if search.sampler.name == "grid":
            try:
                dim.grid_values()
            except ValueError as err:
                raise fail(where, str(err)) from None
    if search.sampler.name == "grid":
        size = math.prod(len(dim.grid_values()) for dim in search.space.values())
        if search.num_trials > size:
            raise fail("search.num_trials", f"the grid sampler's space has only {size} points")
    for i, trial in enumerate(search.first_trials):
        for key, value in trial.items():
            where = f"search.first_trials[{i}].{key}"
            if key not in search.space:
                raise fail(where, "not in search.space; first trials set only the searched keys")
            if not search.space[key].contains(value):
                raise fail(where, f"{render_value(value)} is outside the space")
        missing = [k for k in search.space if k not in trial]
        if missing:
            raise fail(f"search.first_trials[{i}]", f"missing {missing[0]}; give every searched key")


def _pydantic_line(err: ValidationError) -> tuple[str, str]:
    """The first error of a pydantic ValidationError as (dotted location, message)."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) if not isinstance(p, int) else f"[{p}]" for p in first["loc"]]
    where = ".".join(loc).replace(".[", "[")
    kind = first["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys_at(first["loc"][:-1])
        return where, f"unknown key; valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return where, "required key is missing"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if kind.endswith("_type") or kind.startswith("literal"):
        message = f"{message}, got {render_value(first.get('input'))}"
    return where, message


def _valid_keys_at(loc: Sequence[Any]) -> list[str]:
    model: Any = StudySpec
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(part)
            if field is None:
                return []
            model = _model_in(field.annotation)
        else:
            model = _model_in(typing.get_args(model)[-1]) if typing.get_args(model) else None
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_in(tp: Any) -> Any:
    """The pydantic model inside Optional[...] / list[...] / dict[str, ...], or the type itself."""
    tp = unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, dict):
        return _model_in(typing.get_args(tp)[-1])
    return tp


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
