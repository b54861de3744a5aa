"""What each config key means and which values it accepts: one table (`SCHEMA`) read by the
range check (`check`, run before anything is read or written) and by `--config_help`
(`describe`), so that the meaning of a key and its range are written once.

Every numeric key has a range; a numeric value outside it is a one-line `ConfigError` naming
the key and the range. Keys with names (arch, pooling, classifier ...) are checked where they
are used, against the lists those modules define; here they only have their meaning.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from ctl_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key: its meaning and, for a number, its valid range.

    `low`/`high` bound the value (inclusive unless `low_open`/`high_open`); `choices` lists
    the only values allowed instead; `integer` requires a whole number; `nullable` accepts
    None (an automatic choice); `each` applies the range to every item of a tuple.
    """

    meaning: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    choices: tuple | None = None
    nullable: bool = False
    each: bool = False

    @property
    def numeric(self) -> bool:
        return self.low is not None or self.high is not None or self.choices is not None

    def range_text(self) -> str:
        """The range as a user reads it: '> 0', 'an integer >= 1', 'in [0, 1)', 'one of 2, 4'."""
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{_number(self.low)}, {_number(self.high)}{right}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            text = f"{'<' if self.high_open else '<='} {_number(self.high)}"
        if self.integer and self.choices is None:
            text = f"an integer {text}"
        if self.each:
            text = f"each item {text}"
        if self.nullable:
            text += " (or None: automatic)"
        return text

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        values = tuple(value) if self.each else (value,)
        return all(self._accepts_one(v) for v in values)

    def _accepts_one(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.integer and value != int(value):
            return False
        if self.choices is not None:
            return value in self.choices
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _count(meaning: str, low: int = 1) -> Field:
    return Field(meaning, low=low, integer=True)


def _probability(meaning: str) -> Field:
    return Field(meaning, low=0.0, high=1.0)


def _positive(meaning: str) -> Field:
    return Field(meaning, low=0.0, low_open=True)


def _non_negative(meaning: str) -> Field:
    return Field(meaning, low=0.0)


# The smallest image side: the ResNets pad every strided layer, so each stage keeps at least
# a 1x1 map and any side >= 1 runs (forward passes measured at 1, 2, 3, 4, 8 pixels; 0 ends
# in a JAX shape error). Useful sizes are far larger (64x32 in the demo, 256x128 and up).
MIN_IMAGE_SIDE = 1

SCHEMA: dict[str, Field] = {
    "name": Field("run name: the default work directory is runs/<name>"),
    "seed": _count("seed of the initial weights, centers, sampling and augmentation", low=0),
    "cpu_fast_path": Field("'auto', 'on' or 'off': the CPU layers of ctl_jax/cpu/ (same results)"),
    "cpu_recompute": Field("CPU layers: recompute intermediates when going backward (less memory)"),
    "cpu_winograd_tile": Field(
        "CPU layers: Winograd tile of stride-1 3x3 convolutions", choices=(2, 4), integer=True
    ),
    # data
    "data.name": Field("dataset (synthetic, market1501, folder, ...; see data/README.md)"),
    "data.root": Field("folder holding the dataset"),
    "data.source": Field("'folder' (images on disk) or 'tfds' (a prepared TFDS build)"),
    "data.tfds_data_dir": Field("the prepared TFDS build (data.source='tfds')"),
    "data.train_json": Field("fashion datasets: COCO-style JSON of the training images"),
    "data.query_json": Field("fashion datasets: COCO-style JSON of the query images"),
    "data.gallery_json": Field("fashion datasets: COCO-style JSON of the gallery images"),
    "data.eval_name": Field("evaluate on this dataset instead of data.name ('' = the same)"),
    "data.eval_root": Field("folder of data.eval_name ('' = data.root)"),
    "data.small_identities": Field("identities with fewer than M images: 'pad' or 'drop'"),
    "data.use_val": Field("MSMT17: add list_val.txt to the training images"),
    "data.distractors": Field("Revisited Oxford/Paris: the revisitop1m folder ('' = none)"),
    "data.rotation_fix": Field("INRIA Holidays: '', 'exif' or a file of image rotations"),
    "data.height": _count("input image height in pixels", low=MIN_IMAGE_SIDE),
    "data.width": _count("input image width in pixels", low=MIN_IMAGE_SIDE),
    "data.num_identities": _count("P: identities per training batch"),
    "data.num_instances": _count("M: images per identity in a batch (a batch is P x M)", low=2),
    "data.flip_prob": _probability("probability of a horizontal flip (training)"),
    "data.pad": _count("pixels of padding before the random crop (training)", low=0),
    "data.erasing_prob": _probability("probability of random erasing (training)"),
    "data.erasing_fill": Field("random erasing fill: 'original' constants or 'zero' (the mean)"),
    "data.worker_count": _count("grain worker processes (0: decode in this process)", low=0),
    "data.prefetch_buffer": _count("batches prepared ahead by the reading threads", low=0),
    "data.skip_unreadable": Field("skip unreadable images with a warning instead of failing"),
    "data.eval_batch_size": _count("images per forward pass when embedding"),
    # model
    "model.arch": Field("backbone: resnet18, resnet34, resnet50, resnet101, resnet50_ibn_a, ..."),
    "model.last_stride": Field("stride of the last ResNet stage", choices=(1, 2), integer=True),
    "model.stem_relu": Field("ReLU after the stem batch norm (None: the architecture's choice)"),
    "model.dtype": Field("'float32' or 'bfloat16' (bf16 compute, f32 parameters)"),
    "model.init_checkpoint": Field("ctl_jax checkpoint to start from ('' = random weights)"),
    "model.pooling": Field("global pooling: 'avg', 'max', 'gem' or 'rmac'"),
    "model.gem_p": _positive("GeM pooling exponent (its start value when learnable)"),
    "model.gem_learnable": Field("GeM pooling: train the exponent"),
    "model.rmac_levels": _count("R-MAC pooling: number of region scales"),
    "model.vit_stride": Field(
        "ViT: patch embedding stride (None: the patch size, no overlap; 12: TransReID's)",
        low=1,
        integer=True,
        nullable=True,
    ),
    "model.drop_path": Field(
        "ViT: stochastic depth rate of the last block", low=0.0, high=1.0, high_open=True
    ),
    # loss
    "loss.triplet_weight": _non_negative("weight of the metric loss (triplet or contrastive)"),
    "loss.ce_weight": _non_negative("weight of the identity classification loss"),
    "loss.center_weight": _non_negative("weight of the center loss"),
    "loss.centroid_weight": _non_negative("weight of the centroid triplet loss (0: off)"),
    "loss.margin": _non_negative("margin of the triplet, centroid and contrastive losses"),
    "loss.soft_margin": Field("soft-margin (softplus) triplet losses instead of the margin"),
    "loss.distance": Field("'euclidean' or 'cosine' distance in the metric losses"),
    "loss.label_smoothing": Field(
        "label smoothing of the classifier", low=0.0, high=1.0, high_open=True
    ),
    "loss.center_lr": _non_negative("learning rate of the center-loss centers (plain SGD)"),
    "loss.metric": Field("metric loss: 'triplet' (batch-hard) or 'contrastive'"),
    "loss.classifier": Field("identity classifier: 'softmax', 'cosface' or 'arcface'"),
    "loss.scale": _positive("CosFace/ArcFace logit scale"),
    "loss.classifier_margin": Field(
        "CosFace/ArcFace margin (None: the paper's value)", low=0.0, nullable=True
    ),
    "loss.easy_margin": Field("ArcFace: margin only where the cosine is positive"),
    # solver
    "solver.optimizer": Field("'adam', 'amsgrad' or 'sgd' (with momentum)"),
    "solver.momentum": Field("SGD momentum", low=0.0, high=1.0, high_open=True),
    "solver.schedule": Field("learning-rate schedule: 'step' (milestones) or 'cosine'"),
    "solver.min_lr_factor": _probability("cosine schedule: final learning rate / base_lr"),
    "solver.base_lr": _positive("peak learning rate of the optimiser"),
    "solver.weight_decay": _non_negative("L2 weight decay"),
    "solver.beta1": Field("Adam's first-moment decay", low=0.0, high=1.0, high_open=True),
    "solver.beta2": Field("Adam's second-moment decay", low=0.0, high=1.0, high_open=True),
    "solver.eps": _positive("Adam's epsilon"),
    "solver.warmup_epochs": _count("epochs of linear learning-rate warm-up", low=0),
    "solver.milestones": Field(
        "epochs at which the learning rate is multiplied by gamma", low=1, integer=True, each=True
    ),
    "solver.gamma": Field(
        "learning-rate factor at each milestone", low=0.0, high=1.0, low_open=True
    ),
    "solver.num_epochs": _count("training epochs"),
    # train
    "train.log_every_steps": _count("steps between logged metrics"),
    "train.checkpoint_every_steps": _count("steps between checkpoints (plus one per epoch)"),
    "train.keep_checkpoints": _count("latest checkpoints kept (plus the best by train.monitor)"),
    "train.eval_every_epochs": _count("epochs between evaluations (and one at the end)"),
    "train.monitor": Field("metric whose best checkpoint is kept, e.g. centroid_camera/mAP"),
    # eval
    "eval.protocol": Field("'' (the dataset's own) or market, recall_at_k, revisited, holidays"),
    "eval.modes": Field("evaluation modes: instance, centroid, centroid_camera, ..."),
    "eval.flip": Field("flip test: average each image's embedding with its mirror's"),
}


def flatten(config) -> dict:
    """{dotted key: value} of a config's leaves (groups are walked, not listed)."""
    items = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, (ml_collections.ConfigDict, dict)):
                walk(value, f"{prefix}{key}.")
            else:
                items[prefix + key] = value

    walk(config, "")
    return items


def check(config) -> None:
    """Raises a one-line `ConfigError` for the first numeric key out of its range.

    Keys the schema does not know (a config of one's own may add some) are not checked.
    """
    for key, value in flatten(config).items():
        field = SCHEMA.get(key)
        if field is not None and field.numeric and not field.accepts(value):
            raise ConfigError(
                f"config {key}={value!r}: expected {field.range_text()} ({field.meaning})"
            )


def describe(config, source: str) -> str:
    """The keys of `config` with their values, ranges and meanings (`--config_help`): the
    top-level keys, then one block per group."""
    items = sorted(flatten(config).items(), key=lambda kv: ("." in kv[0], kv[0]))
    width = min(max(len(f"{k}={v!r}") for k, v in items), 44)
    lines = [f"config keys of {source} (override with --config.<key>=<value>):"]
    group = ""
    for key, value in items:
        head = key.split(".")[0] if "." in key else ""
        if head != group:
            group = head
            lines.append(f"[{head}]")
        field = SCHEMA.get(key)
        meaning = field.meaning if field else "(not described)"
        if field is not None and field.numeric:
            meaning += f"; {field.range_text()}"
        lines.append(f"  {f'{key}={value!r}':<{width}}  {meaning}")
    return "\n".join(lines)
