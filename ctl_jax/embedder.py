"""`Embedder`: a trained model as a function from images to embeddings (the Python API).

    from ctl_jax import Embedder

    embedder = Embedder.load("runs/default")           # work dir or converted checkpoint
    vectors = embedder(["a.jpg", "b.png"])              # (2, D) float32
    vectors = embedder(uint8_batch)                     # (N, H, W, 3) uint8 RGB -> (N, D)

The embedding is the un-normalised BNNeck output, the vector `python -m ctl_jax.embed`
writes (the `embed` and `search --images` commands run their images through an Embedder).
Every image gets the test-time preprocessing of evaluation: RGB decode
(`ctl_jax.data.image_io.decode_pil`), bilinear resize to the model's input size
(`ctl_jax.data.transforms.resize_pil`) and ImageNet normalisation (`transforms.normalize`).
Files named by path go through the evaluation input pipeline itself (`ctl_jax.inference.
embed_split`: threaded decoding); images already in memory go through the same functions in
this thread. Either way the batches run through the one embedding loop
(`ctl_jax.inference.embed_batches`) and the jitted forward pass (`make_embed_fn`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ctl_jax.data import image_io, transforms
from ctl_jax.errors import InvalidValueError, UnreadableImageError

ImageLike = str | os.PathLike | Image.Image | np.ndarray


def small_batch(batch_size: int, num_images: int) -> int:
    """The batch for `num_images` images: `batch_size`, or for fewer images the next power
    of two (a few query images are not padded to a batch of 128: at ResNet-50 256x128 that
    padding was most of a 10-image command's time). Powers of two keep the compiled
    programs few (8 at most below 128), and each is in the persistent cache after its
    first use."""
    return max(1, min(int(batch_size), 1 << max(0, int(num_images) - 1).bit_length()))


class Embedder:
    """Images in, (N, D) float32 BNNeck embeddings out, with a restored model.

    Build it with `Embedder.load(directory)`; calling it is thread-safe (JAX's compiled
    functions are), though each call runs its own batches.

    Attributes:
      model: the `ReidModel`.
      variables: {"params", "batch_stats"} placed on the device mesh.
      height, width: the model's input size (the training config's `data.height/width`).
      batch_size: images per forward pass (a multiple of the device count).
      flip: flip test: each embedding is the mean of the image's and its mirror's.
      step: the checkpoint step the weights came from (None if built from variables).
      config: the run config (None if not known).
    """

    def __init__(
        self,
        model,
        variables: dict,
        height: int,
        width: int,
        *,
        batch_size: int = 32,
        flip: bool = False,
        mesh=None,
        step: int | None = None,
        config: Any = None,
    ):
        # JAX is imported here, not at module level: `import ctl_jax` stays light and the
        # command lines check their flags before paying for it.
        from ctl_jax import parallel
        from ctl_jax.inference import make_embed_fn, place_variables

        if batch_size < 1:
            raise InvalidValueError(f"Embedder batch_size must be >= 1, got {batch_size}")
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        devices = self.mesh.devices.size
        self.model = model
        self.variables = place_variables(variables, self.mesh)
        self.height, self.width = int(height), int(width)
        # The batch must split evenly over the devices: round up.
        self.batch_size = -(-int(batch_size) // devices) * devices
        self.flip = bool(flip)
        self.step = step
        self.config = config
        self._embed_fn = make_embed_fn(model, self.mesh, flip=self.flip)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        step: int | None = None,
        batch_size: int | None = None,
        flip: bool = False,
        cpu_fast_path: str | None = None,
        mesh=None,
    ) -> Embedder:
        """The model of a training work directory or a converted checkpoint directory.

        Args:
          directory: holds `checkpoints/` (`python -m ctl_jax.train --workdir` or
            `python -m ctl_jax.convert --output`).
          step: checkpoint step; default the latest.
          batch_size: images per forward pass; default the config's `data.eval_batch_size`.
          flip: flip test (twice the network time).
          cpu_fast_path: "auto", "on" or "off" (the layer set, `ctl_jax.build`); default the
            saved config's choice.
          mesh: device mesh; default all devices.

        Raises:
          CheckpointError / MissingFileError: no readable checkpoint in `directory`.
        """
        from ctl_jax.build import build_model
        from ctl_jax.checkpoints import restore_model
        from ctl_jax.checkpoints.store import CheckpointError

        if not pathlib.Path(directory).is_dir():
            raise CheckpointError(
                f"{directory} is not a folder; give a training work directory or a converted "
                "checkpoint directory (one holding checkpoints/)"
            )
        restored = restore_model(directory, step=step)
        model = restored.model
        if cpu_fast_path is not None:
            model = build_model(restored.config, restored.num_classes, cpu_fast_path=cpu_fast_path)
        data = restored.config.data
        return cls(
            model,
            restored.variables,
            int(data.height),
            int(data.width),
            batch_size=int(batch_size or data.eval_batch_size),
            flip=flip,
            mesh=mesh,
            step=restored.step,
            config=restored.config,
        )

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) every image is resized to."""
        return self.height, self.width

    @property
    def dim(self) -> int:
        """D, the embedding width (512 for ResNet-18/34, else 2048)."""
        from ctl_jax.models.reid import feature_dim

        if self.config is not None:
            return feature_dim(self.config.model.arch)
        return int(self(np.zeros((1, self.height, self.width, 3), np.uint8)).shape[1])

    def fingerprint(self) -> str:
        """ "sha256:<16 hex digits>" of what decides the embeddings: the weights (every
        variable's path, dtype, shape and bytes), the input size and the flip test. The
        embeddings file records it (`model`), so that files embedded by different models
        are not joined (`ctl_jax.retrieval.shards.merge`). Not the batch size, the layer
        set or the config's file paths, which do not change what a model computes."""
        import hashlib

        import jax

        digest = hashlib.sha256(
            f"{type(self.model).__name__};{self.height}x{self.width};flip={self.flip}".encode()
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.variables):
            array = np.asarray(leaf)
            digest.update(f"{jax.tree_util.keystr(path)};{array.dtype};{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return "sha256:" + digest.hexdigest()[:16]

    def __call__(self, images: np.ndarray | Sequence[ImageLike]) -> np.ndarray:
        """Embeds a batch of images.

        Args:
          images: a uint8 (N, H, W, 3) RGB array (any H, W: resized to the input size as a
            decoded file would be), or a sequence of image file paths, PIL images or uint8
            (H, W, 3) arrays (mixed freely).

        Returns:
          (N, D) float32 BNNeck embeddings, not normalised, in input order.

        Raises:
          InvalidValueError: an array of another dtype or shape, or an item of another type.
          UnreadableImageError: a path that cannot be read or decoded (the message names it).
        """
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise InvalidValueError(
                    "Embedder: an image batch must be uint8 (N, H, W, 3) RGB, got "
                    f"{images.dtype} {images.shape}"
                )
            items: Sequence[ImageLike] = images
        elif isinstance(images, (str, os.PathLike, Image.Image)):
            raise InvalidValueError(
                "Embedder: pass a list of images (e.g. [path]) or a (N, H, W, 3) uint8 batch"
            )
        else:
            items = list(images)
        if len(items) == 0:
            raise InvalidValueError("Embedder: no images given")
        if not isinstance(items, np.ndarray) and all(
            isinstance(x, (str, os.PathLike)) for x in items
        ):
            # Through the input pipeline; an unreadable file raises, naming it.
            return self.embed_files(items, skip_unreadable=False)[0]
        return self._embed_in_memory(items)

    def embed_files(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        skip_unreadable: bool = True,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeds image files through the evaluation input pipeline (threaded decoding).

        Args:
          paths: (N,) image file paths.
          skip_unreadable: an unreadable image gets a zero row and valid False (with an
            `UnreadableImageWarning`) instead of raising `UnreadableImageError`.
          progress: show a progress bar.

        Returns:
          embeddings (N, D) float32, not normalised (zero rows where not valid), and valid
          (N,) bool.
        """
        from ctl_jax.data.image_io import FileImageReader
        from ctl_jax.data.records import Split
        from ctl_jax.inference import embed_split

        paths = [str(p) for p in paths]
        unknown = np.full(len(paths), -1, np.int64)
        split = Split.from_lists(paths, unknown, unknown)
        return embed_split(
            self._embed_fn,
            self.variables,
            split,
            FileImageReader(split.paths),
            self.height,
            self.width,
            small_batch(self.batch_size, len(paths)),
            self.mesh,
            skip_unreadable=skip_unreadable,
            progress=progress,
            leave=True,
        )

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image at the model's input size: (height, width, 3) uint8 RGB.

        Paths are read and decoded as the input pipeline does (`image_io.decode_pil`); PIL
        images are converted to RGB; arrays must be uint8 (H, W, 3). The resize is
        `transforms.resize_pil`, bilinear, as in evaluation.
        """
        if isinstance(image, (str, os.PathLike)):
            path = str(image)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise UnreadableImageError(f"cannot read image {path!r}: {e}") from e
            image = image_io.decode_pil(data, path)
        elif isinstance(image, Image.Image):
            if image.mode != "RGB":
                image = image.convert("RGB")
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise InvalidValueError(
                    "Embedder: an image array must be uint8 (H, W, 3) RGB, got "
                    f"{image.dtype} {image.shape}"
                )
            if image.shape[:2] == (self.height, self.width):
                return image
            image = Image.fromarray(image)
        else:
            raise InvalidValueError(
                "Embedder: images must be paths, PIL images or uint8 arrays, got "
                f"{type(image).__name__}"
            )
        return transforms.resize_pil(image, self.height, self.width)

    def _embed_in_memory(self, items: Sequence[ImageLike]) -> np.ndarray:
        from ctl_jax.inference import embed_batches

        embeddings, _ = embed_batches(
            self._embed_fn, self.variables, self._batches(items), len(items), self.mesh
        )
        return embeddings

    def _batches(self, items: Sequence[ImageLike]) -> Iterator[dict]:
        """Evaluation-style batches (see `ctl_jax.inference.embed_batches`) of in-memory
        images, preprocessed one batch at a time.

        A batch is padded to the next size in {d, 2d, 4d, ..., batch_size} (d = devices):
        any N compiles at most log2(batch_size) shapes, and a single image does not pay
        for a full batch.
        """
        devices = self.mesh.devices.size
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            size = devices
            while size < len(chunk):
                size *= 2
            size = min(size, self.batch_size)
            images = np.zeros((size, self.height, self.width, 3), np.float32)
            for row, item in enumerate(chunk):
                images[row] = transforms.normalize(self.preprocess(item))
            index = np.full(size, -1, np.int64)
            index[: len(chunk)] = np.arange(start, start + len(chunk))
            yield {"images": images, "index": index, "valid": index >= 0}
