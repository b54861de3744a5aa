"""grain input pipelines: P x M training batches and ordered evaluation batches.

Training, one iterator per epoch::

    plan  = identity_batches(pids, P, M, seed, epoch)       # (num_batches, P*M) indices
    local = shard_batches(plan, process_index, process_count)
    MapDataset.source(slots of `local`, flattened)           # item k = one batch slot
      .map(_LoadImage)      reader.read + PIL decode + bilinear resize -> uint8
      .map(_AugmentImage)   flip, pad + crop, normalise, random erasing -> float32
      .batch(P*M // process_count)
      .to_iter_dataset(ReadOptions(read_threads, prefetch_buffer))
      [.mp_prefetch(worker_count)]

Randomness: the augmentation of a slot uses ``augment_rng(seed, epoch, slot)`` where
``slot`` is the slot's position in the *global* epoch plan (``batch * P * M + column``).
This is deliberately our own derivation rather than grain's ``random_map`` seeding (which
keys on the element index of the dataset it is applied to): a slot gets the same
augmentation whatever the number of processes, worker processes or threads, and tests can
replay it without grain internals. Resuming mid-epoch: save ``iterator.get_state()`` (a
JSON-able dict), rebuild the iterator for the same epoch and ``set_state`` it.

Unreadable images (missing, truncated, not an image): with ``skip_unreadable`` (default)
the slot gets a zero image and ``valid=False`` and an `UnreadableImageWarning` with the
running count of this process is emitted; otherwise `UnreadableImageError` names the path.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from absl import flags

from ctl_jax.data import image_io, sampler, transforms
from ctl_jax.data.records import Split
from ctl_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TrainPipelineConfig:
    """Options of the training pipeline.

    Attributes:
      height, width: model input size (256 x 128 in the re-ID recipes).
      P, M: identities per global batch, instances per identity.
      seed: run seed; with the epoch it fixes the plan and every augmentation.
      flip_prob, pad, erasing_prob, erasing_fill: see `transforms.TrainAugment`.
      worker_count: grain worker processes (0: decode in this process with threads).
      worker_buffer_size: batches each worker process prepares ahead.
      read_threads: threads preparing batches (in this process, or in each worker).
      prefetch_buffer: batches prepared ahead by the threads.
      skip_unreadable: unreadable image -> invalid slot + warning (True) or error (False).
    """

    height: int = 256
    width: int = 128
    P: int = 16
    M: int = 4
    seed: int = 0
    flip_prob: float = 0.5
    pad: int = 10
    erasing_prob: float = 0.5
    erasing_fill: str = "original"
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    prefetch_buffer: int = 2
    skip_unreadable: bool = True

    @classmethod
    def from_run_config(cls, config) -> TrainPipelineConfig:
        """The training pipeline of a run config (`configs/*.py`): its `data` group and seed.

        The one mapping from config names to pipeline options (P = data.num_identities,
        M = data.num_instances); options the config does not set keep their defaults.
        """
        d = config.data
        return cls(
            height=d.height,
            width=d.width,
            P=d.num_identities,
            M=d.num_instances,
            seed=config.seed,
            flip_prob=d.flip_prob,
            pad=d.pad,
            erasing_prob=d.erasing_prob,
            erasing_fill=d.erasing_fill,
            worker_count=d.worker_count,
            prefetch_buffer=d.prefetch_buffer,
            skip_unreadable=d.skip_unreadable,
        )

    @property
    def augment(self) -> transforms.TrainAugment:
        return transforms.TrainAugment(
            flip_prob=self.flip_prob,
            pad=self.pad,
            erasing_prob=self.erasing_prob,
            erasing_fill=self.erasing_fill,
        )


def augment_rng(seed: int, epoch: int, slot: int) -> np.random.Generator:
    """The generator of every random choice made for global plan slot ``slot`` of ``epoch``."""
    return np.random.default_rng((seed, epoch, sampler.AUGMENT_STREAM, slot))


def train_batches_per_epoch(pids: np.ndarray, P: int, M: int, seed: int, epoch: int) -> int:
    """Number of batches of ``epoch`` (identical on every process; may vary by epoch)."""
    return sampler.num_batches(pids, P, M, seed, epoch)


class _SlotSource:
    """Random-access source: item k is slot k of the flattened local plan."""

    def __init__(self, slots, indices, labels, camids):
        self.slots = np.asarray(slots, np.int64)
        self.indices = np.asarray(indices, np.int64)
        self.labels = np.asarray(labels, np.int32)
        self.camids = np.asarray(camids, np.int32)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        return {
            "slot": int(self.slots[k]),
            "index": int(self.indices[k]),
            "labels": self.labels[k],
            "camids": self.camids[k],
        }


class _LoadImage:
    """Reads, decodes and resizes the image of a slot: adds ``image`` uint8 and ``valid``."""

    def __init__(self, reader, paths, height: int, width: int, skip_unreadable: bool):
        self.reader = reader
        self.paths = paths
        self.height = height
        self.width = width
        self.skip_unreadable = skip_unreadable

    def __call__(self, element: dict) -> dict:
        index = element.pop("index")
        image = None
        if index >= 0:
            path = str(self.paths[index])
            try:
                data = self.reader.read(index)
                decoded = image_io.decode_pil(data, path)
                image = transforms.resize_pil(decoded, self.height, self.width)
            except OSError as e:
                if not self.skip_unreadable:
                    message = e.args[0] if isinstance(e, image_io.UnreadableImageError) else (
                        f"cannot read image {path!r}: {e}"
                    )
                    raise image_io.UnreadableImageError(
                        f"{message} (training skips such images with data.skip_unreadable=True)"
                    ) from e
                image_io.UNREADABLE.report(path, e)
        element["image"] = image
        element["valid"] = np.bool_(image is not None)
        return element


class _AugmentImage:
    """Training augmentation with the slot's own generator; zero image for invalid slots."""

    def __init__(self, augment: transforms.TrainAugment, seed: int, epoch: int, height, width):
        self.augment = augment
        self.seed = seed
        self.epoch = epoch
        self.shape = (height, width, 3)

    def __call__(self, element: dict) -> dict:
        image = element.pop("image")
        slot = element.pop("slot")
        if image is None:
            element["images"] = np.zeros(self.shape, np.float32)
        else:
            element["images"] = self.augment(image, augment_rng(self.seed, self.epoch, slot))
        return element


class _EvalImage:
    """Evaluation transform (resize + normalise); zero image for padding / unreadable."""

    def __init__(self, height: int, width: int):
        self.shape = (height, width, 3)

    def __call__(self, element: dict) -> dict:
        image = element.pop("image")
        if image is None:
            element["images"] = np.zeros(self.shape, np.float32)
        else:
            element["images"] = transforms.normalize(image)
        return element


def _slot_labels(plan: np.ndarray, pids: np.ndarray, M: int) -> np.ndarray:
    """Label of every slot; padding takes its group's identity (a group's first slot is real)."""
    first_of_group = np.repeat(plan.reshape(len(plan), -1, M)[:, :, 0], M, axis=1)
    return pids[first_of_group]


def _to_iterator(
    dataset: grain.MapDataset, read_threads, prefetch_buffer, worker_count, worker_buffer_size
) -> grain.DatasetIterator:
    read_options = grain.ReadOptions(
        num_threads=max(1, read_threads), prefetch_buffer_size=max(1, prefetch_buffer)
    )
    iter_dataset = dataset.to_iter_dataset(read_options)
    if worker_count > 0:
        # grain reads its absl flags when it starts workers. Under absl.app.run they are
        # parsed; elsewhere (tests, notebooks) use the defaults instead of failing with
        # UnparsedFlagAccessError.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter(iter_dataset)


def make_train_iterator(
    split: Split,
    reader,
    cfg,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Iterator over this process's part of one epoch of P x M training batches.

    Args:
      split: training split (pids relabelled to 0..num_classes-1).
      reader: picklable object with ``read(index) -> bytes`` for indices of ``split``.
      cfg: `TrainPipelineConfig`, or a run config (see `TrainPipelineConfig.from_run_config`).
      epoch: epoch number; fixes the plan and the augmentations with ``cfg.seed``.
      process_index, process_count: data-parallel process of this host; each gets
        identities ``process_index * P / process_count ..`` of every batch.

    Returns:
      A grain ``DatasetIterator`` (``get_state`` / ``set_state``) of
      `train_batches_per_epoch` dicts with B = P * M // process_count:
        images: (B, H, W, 3) float32 normalised; zeros where not valid.
        labels: (B,) int32 identity label; padded slots carry their group's identity.
        camids: (B,) int32 camera id; -1 for padded slots.
        valid: (B,) bool; False for padding and unreadable images.
    """
    if not isinstance(cfg, TrainPipelineConfig):
        cfg = TrainPipelineConfig.from_run_config(cfg)
    plan = sampler.identity_batches(split.pids, cfg.P, cfg.M, cfg.seed, epoch)
    global_batch = cfg.P * cfg.M
    slots = np.arange(plan.size, dtype=np.int64).reshape(plan.shape)
    labels = _slot_labels(plan, split.pids, cfg.M) if len(plan) else plan
    camids = np.where(plan >= 0, split.camids[np.maximum(plan, 0)], -1) if len(plan) else plan
    shard = [
        sampler.shard_batches(a, process_index, process_count, M=cfg.M)
        for a in (plan, slots, labels, camids)
    ]
    local_plan, local_slots, local_labels, local_camids = (a.reshape(-1) for a in shard)
    dataset = (
        grain.MapDataset.source(_SlotSource(local_slots, local_plan, local_labels, local_camids))
        .map(_LoadImage(reader, split.paths, cfg.height, cfg.width, cfg.skip_unreadable))
        .map(_AugmentImage(cfg.augment, cfg.seed, epoch, cfg.height, cfg.width))
        .batch(global_batch // process_count, drop_remainder=True)
    )
    return _to_iterator(
        dataset, cfg.read_threads, cfg.prefetch_buffer, cfg.worker_count, cfg.worker_buffer_size
    )


def train_batch_spec(cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array of a global training batch (all processes' rows), as
    `make_train_iterator` yields them with B = P * M; the training step is compiled for these
    before the first batch is read (`ctl_jax.training.ahead`).

    Args:
      cfg: `TrainPipelineConfig`, or a run config (see `TrainPipelineConfig.from_run_config`).
    """
    if not isinstance(cfg, TrainPipelineConfig):
        cfg = TrainPipelineConfig.from_run_config(cfg)
    b = cfg.P * cfg.M
    return {
        "images": ((b, cfg.height, cfg.width, 3), np.dtype(np.float32)),
        "labels": ((b,), np.dtype(np.int32)),
        "camids": ((b,), np.dtype(np.int32)),
        "valid": ((b,), np.dtype(np.bool_)),
    }


def eval_num_batches(num_images: int, batch_size: int) -> int:
    """Number of evaluation batches: ``ceil(num_images / batch_size)`` (last one padded)."""
    return -(-num_images // batch_size)


def make_eval_iterator(
    split: Split,
    reader,
    height: int,
    width: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    read_threads: int = 2,
    prefetch_buffer: int = 2,
    skip_unreadable: bool = False,
) -> grain.DatasetIterator:
    """Ordered evaluation batches of ``split`` with the test-time transform.

    Global batch k covers split positions ``k * batch_size ..``; this process gets rows
    ``process_index * b .. (process_index + 1) * b`` of it, ``b = batch_size // process_count``.
    The last batch is padded, never dropped; every process yields `eval_num_batches` batches.

    Returns:
      Iterator of dicts:
        images: (b, H, W, 3) float32 normalised; zeros where not valid.
        valid: (b,) bool; False for padding (and unreadable images if ``skip_unreadable``).
        index: (b,) int64 position in ``split``; -1 for padding.
    """
    if batch_size % process_count:
        raise ConfigError(
            f"eval batch_size={batch_size} must be divisible by process_count={process_count}"
        )
    n_batches = eval_num_batches(len(split), batch_size)
    positions = np.arange(n_batches * batch_size, dtype=np.int64).reshape(n_batches, batch_size)
    positions = np.where(positions < len(split), positions, -1)
    local = sampler.shard_batches(positions, process_index, process_count).reshape(-1)
    zeros = np.zeros(len(local), np.int32)
    dataset = (
        grain.MapDataset.source(_SlotSource(local, local, zeros, zeros))
        .map(_LoadImage(reader, split.paths, height, width, skip_unreadable))
        .map(_EvalImage(height, width))
        .map(_eval_keys)
        .batch(batch_size // process_count, drop_remainder=True)
    )
    return _to_iterator(dataset, read_threads, prefetch_buffer, 0, 1)


def _eval_keys(element: dict) -> dict:
    return {
        "images": element["images"],
        "valid": element["valid"],
        "index": np.int64(element["slot"]),
    }
