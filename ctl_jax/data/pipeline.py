"""grain input pipelines: P x M training batches and ordered evaluation batches.

Training, one iterator per epoch::

    plan  = identity_batches(pids, P, M, seed, epoch)       # (num_batches, P*M) indices
    local = shard_batches(plan, process_index, process_count)
    MapDataset.source(rows of `local`)                      # item k = local batch k
      .map(_LoadBatch)      per slot: read + PIL decode + bilinear resize, then flip and
                            pad + crop into the batch's uint8 array; erasing drawn, not applied
      .to_iter_dataset(ReadOptions(read_threads, prefetch_buffer))
      [.mp_prefetch(worker_count)]

The host stops at uint8: normalising and writing the erasing fill happen on the device in
the jitted step (`ctl_jax.data.on_device`), where they are one fused elementwise pass; a
batch is 4x smaller than in float32 between worker processes and to the device. One grain
element is a whole batch, not an image: grain's per-element bookkeeping and the final
``np.stack`` are paid once per batch, and the threads (or workers) work on different batches.

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
from PIL import Image

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


class _EpochRows:
    """One epoch's local batches: the plan's rows of this process with their slot numbers
    (positions in the global plan), labels and camera ids, all (num_batches, B)."""

    def __init__(self, split: Split, cfg: TrainPipelineConfig, epoch, process_index, count):
        plan = sampler.identity_batches(split.pids, cfg.P, cfg.M, cfg.seed, epoch)
        slots = np.arange(plan.size, dtype=np.int64).reshape(plan.shape)
        labels = _slot_labels(plan, split.pids, cfg.M) if len(plan) else plan
        camids = np.where(plan >= 0, split.camids[np.maximum(plan, 0)], -1) if len(plan) else plan
        self.indices, self.slots, self.labels, self.camids = (
            sampler.shard_batches(a, process_index, count, M=cfg.M)
            for a in (plan, slots, labels, camids)
        )
        self.labels = self.labels.astype(np.int32)
        self.camids = self.camids.astype(np.int32)


class _EpochsSource:
    """Random-access source over consecutive epochs: item k is the k-th local batch counted
    from batch ``start_batch`` of ``first_epoch``. Each epoch's plan is built where it is
    read (in the worker processes too) and the last two are kept: an iterator crosses an
    epoch boundary once, and its workers read batches in order."""

    def __init__(self, split, cfg, first_epoch, epochs, start_batch, process_index, count):
        self.split = split
        self.cfg = cfg
        self.first_epoch = first_epoch
        self.start_batch = start_batch
        self.process = (process_index, count)
        first = _EpochRows(split, cfg, first_epoch, process_index, count)
        counts = [len(first.indices) - start_batch] + [
            train_batches_per_epoch(split.pids, cfg.P, cfg.M, cfg.seed, e)
            for e in range(first_epoch + 1, first_epoch + epochs)
        ]
        self.ends = np.cumsum(counts)
        self._rows = {first_epoch: first}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _epoch_rows(self, epoch: int) -> _EpochRows:
        rows = self._rows.get(epoch)
        if rows is None:  # a race between threads only builds the same rows twice
            rows = _EpochRows(self.split, self.cfg, epoch, *self.process)
            self._rows = {e: r for e, r in self._rows.items() if e == epoch - 1}
            self._rows[epoch] = rows
        return rows

    def __getitem__(self, k: int) -> dict:
        j = int(np.searchsorted(self.ends, k, side="right"))
        b = k - (int(self.ends[j - 1]) if j else -self.start_batch)
        rows = self._epoch_rows(self.first_epoch + j)
        return {
            "epoch": self.first_epoch + j,
            "slots": rows.slots[b],
            "indices": rows.indices[b],
            "labels": rows.labels[b],
            "camids": rows.camids[b],
        }


class _Decoder:
    """Reads, decodes and resizes dataset images (uint8) or reports them unreadable."""

    def __init__(self, reader, paths, height: int, width: int, skip_unreadable: bool):
        self.reader = reader
        self.paths = paths
        self.height = height
        self.width = width
        self.skip_unreadable = skip_unreadable

    def __call__(self, index: int) -> np.ndarray | None:
        """(height, width, 3) uint8 image of dataset index ``index``; None for padding
        (index < 0) and, with ``skip_unreadable``, for unreadable images."""
        image = self.pil(index)
        return None if image is None else np.asarray(image)

    def pil(self, index: int) -> Image.Image | None:
        """`__call__` as an RGB PIL image."""
        if index < 0:
            return None
        path = str(self.paths[index])
        try:
            data = self.reader.read(index)
            decoded = image_io.decode_pil(data, path)
            return transforms.resize_pil_image(decoded, self.height, self.width)
        except OSError as e:
            if not self.skip_unreadable:
                message = (
                    e.args[0]
                    if isinstance(e, image_io.UnreadableImageError)
                    else f"cannot read image {path!r}: {e}"
                )
                raise image_io.UnreadableImageError(
                    f"{message} (training skips such images with data.skip_unreadable=True)"
                ) from e
            image_io.UNREADABLE.report(path, e)
            return None


class _LoadImage(_Decoder):
    """Adds ``image`` (uint8 or None) and ``valid`` to an element of `_SlotSource`."""

    def __call__(self, element: dict) -> dict:
        image = super().__call__(element.pop("index"))
        element["image"] = image
        element["valid"] = np.bool_(image is not None)
        return element


class _LoadBatch:
    """Builds the host part of one training batch from an item of `_EpochsSource`.

    Every slot's image is decoded, resized, flipped and padded + cropped straight into the
    batch's uint8 array, and its erasing rectangle drawn, with the slot's own generator
    (`augment_rng`); invalid slots stay zero with an empty rectangle.
    """

    def __init__(self, decoder: _Decoder, augment: transforms.TrainAugment, seed: int):
        self.decoder = decoder
        self.augment = augment
        self.seed = seed

    def __call__(self, row: dict) -> dict:
        indices = row["indices"]
        b = len(indices)
        images = np.zeros((b, self.decoder.height, self.decoder.width, 3), np.uint8)
        erase = np.zeros((b, 4), np.int32)
        valid = np.zeros(b, np.bool_)
        for i in range(b):
            image = self.decoder.pil(int(indices[i]))
            if image is None:
                continue
            rng = augment_rng(self.seed, row["epoch"], int(row["slots"][i]))
            erase[i] = self.augment.geometry_into(image, rng, images[i])
            valid[i] = True
        return {
            "images": images,
            "erase": erase,
            "labels": row["labels"],
            "camids": row["camids"],
            "valid": valid,
        }


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
        # Only the images go through shared memory: a segment per array costs its creation,
        # resource-tracker messages and unlinking, more than pickling the four small arrays
        # (children's CPU -6% at one worker on 1,344-image epochs).
        iter_dataset = grain.experimental.WithOptionsIterDataset(
            iter_dataset, grain.experimental.DatasetOptions(min_shm_size=1 << 16)
        )
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
    *,
    epochs: int = 1,
    start_batch: int = 0,
) -> grain.DatasetIterator:
    """Iterator over this process's part of ``epochs`` epochs of P x M training batches.

    Args:
      split: training split (pids relabelled to 0..num_classes-1).
      reader: picklable object with ``read(index) -> bytes`` for indices of ``split``.
      cfg: `TrainPipelineConfig`, or a run config (see `TrainPipelineConfig.from_run_config`).
      epoch: first epoch; with ``cfg.seed`` each epoch fixes its plan and augmentations.
      process_index, process_count: data-parallel process of this host; each gets
        identities ``process_index * P / process_count ..`` of every batch.
      epochs: consecutive epochs to go through, ``epoch .. epoch + epochs - 1``: one
        iterator for a whole run keeps its worker processes (``cfg.worker_count``), which
        are started once instead of every epoch (a spawned worker imports grain, which
        imports jax and orbax: about 1 CPU second each, a sixth of a Market-1501 epoch's
        decoding), and they prepare the next epoch's first batches while the current one
        ends.
      start_batch: batches of ``epoch`` to skip (resuming mid-epoch: the batches are a
        function of (seed, epoch, batch), so skipping them resumes exactly).

    Returns:
      A grain ``DatasetIterator`` (``get_state`` / ``set_state``) of the epochs' batches,
      `train_batches_per_epoch` for each (less ``start_batch`` for the first), in order;
      dicts with B = P * M // process_count:
        images: (B, H, W, 3) uint8, resized, flipped, padded + cropped; zeros where not
          valid. Not normalised: `ctl_jax.data.on_device.finish_train_images` does that.
        erase: (B, 4) int32 random-erasing rectangle (top, left, h, w); h = w = 0 for none.
        labels: (B,) int32 identity label; padded slots carry their group's identity.
        camids: (B,) int32 camera id; -1 for padded slots.
        valid: (B,) bool; False for padding and unreadable images.
    """
    if not isinstance(cfg, TrainPipelineConfig):
        cfg = TrainPipelineConfig.from_run_config(cfg)
    source = _EpochsSource(split, cfg, epoch, epochs, start_batch, process_index, process_count)
    decoder = _Decoder(reader, split.paths, cfg.height, cfg.width, cfg.skip_unreadable)
    dataset = grain.MapDataset.source(source).map(_LoadBatch(decoder, cfg.augment, cfg.seed))
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
        "images": ((b, cfg.height, cfg.width, 3), np.dtype(np.uint8)),
        "erase": ((b, 4), np.dtype(np.int32)),
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
