"""grain training and evaluation pipelines on a few tiny image files."""

import json
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image

from ctl_jax.configs import load_config
from ctl_jax.data import image_io, on_device, pipeline, sampler, transforms
from ctl_jax.data.image_io import FileImageReader, UnreadableImageError, UnreadableImageWarning
from ctl_jax.data.records import Split

H, W = 16, 8


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """7 identities with 1..6 images: RGB JPEG, PNG, grayscale and RGBA PNG, odd sizes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths, pids, camids = [], [], []
    for pid, count in enumerate([6, 4, 1, 5, 3, 6, 2]):
        for k in range(count):
            pixels = rng.integers(0, 256, (20 + k, 10 + pid, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            kind = (pid + k) % 4
            if kind == 0:
                path = root / f"{pid:04d}_c{k % 3 + 1}s1_{k}.jpg"
                image.save(path, quality=90)
            else:
                path = root / f"{pid:04d}_c{k % 3 + 1}s1_{k}.png"
                image = {1: image, 2: image.convert("L"), 3: image.convert("RGBA")}[kind]
                image.save(path)
            paths.append(str(path))
            pids.append(pid)
            camids.append(k % 3)
    order = rng.permutation(len(paths))
    return Split.from_lists(np.array(paths)[order], np.array(pids)[order], np.array(camids)[order])


def _cfg(**overrides):
    options = dict(height=H, width=W, P=2, M=4, seed=3, read_threads=2, prefetch_buffer=2)
    options.update(overrides)
    return pipeline.TrainPipelineConfig(**options)


def _all(iterator):
    return [dict(batch) for batch in iterator]


def _expected_epoch(split, cfg, epoch):
    """The epoch computed by hand: plan, decode, resize and augment with the slot's RNG
    (the float32 chain of `transforms.TrainAugment`, normalised and erased on the host)."""
    plan = sampler.identity_batches(split.pids, cfg.P, cfg.M, cfg.seed, epoch)
    batches = []
    for b, row in enumerate(plan):
        images, labels, camids = [], [], []
        for j, index in enumerate(row):
            slot = b * cfg.P * cfg.M + j
            if index < 0:
                images.append(np.zeros((H, W, 3), np.float32))
                labels.append(split.pids[row[j - j % cfg.M]])
                camids.append(-1)
                continue
            with open(split.paths[index], "rb") as f:
                decoded = image_io.decode_image(f.read())
            image = transforms.resize(decoded, H, W)
            images.append(cfg.augment(image, pipeline.augment_rng(cfg.seed, epoch, slot)))
            labels.append(split.pids[index])
            camids.append(split.camids[index])
        batches.append(
            {
                "images": np.stack(images),
                "labels": np.array(labels, np.int32),
                "camids": np.array(camids, np.int32),
                "valid": row >= 0,
            }
        )
    return batches


def _finished(batch, cfg):
    """The float32 images the training step sees: the pipeline's uint8 images normalised
    and erased on the device."""
    return np.asarray(
        on_device.finish_train_images(
            batch["images"], batch["erase"], batch["valid"], cfg.erasing_fill
        )
    )


def _assert_batches_equal(actual, expected, cfg):
    """Pipeline batches (uint8 images + erasing rectangles) against `_expected_epoch`."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert set(a) == {"images", "erase", "labels", "camids", "valid"}
        assert a["images"].dtype == np.uint8 and a["erase"].dtype == np.int32
        np.testing.assert_allclose(_finished(a, cfg), e["images"], rtol=0, atol=2e-6)
        for key in ("labels", "camids", "valid"):
            assert a[key].dtype == e[key].dtype, key
            np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def _assert_same_batches(actual, expected):
    """Batch lists equal array for array (both from the pipeline)."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert set(a) == set(e)
        for key in e:
            assert a[key].dtype == e[key].dtype, key
            np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def test_train_batches_match_direct_computation(split):
    cfg = _cfg()
    reader = FileImageReader(split.paths)
    for epoch in (0, 1):
        batches = _all(pipeline.make_train_iterator(split, reader, cfg, epoch))
        _assert_batches_equal(batches, _expected_epoch(split, cfg, epoch), cfg)
        assert len(batches) == pipeline.train_batches_per_epoch(
            split.pids, cfg.P, cfg.M, cfg.seed, epoch
        )
        valid = np.stack([b["valid"] for b in batches])
        assert not valid.all(), "the fixture should produce padded slots"
        assert (np.stack([b["images"] for b in batches])[~valid] == 0).all()


def test_run_config_accepted(split):
    """A run config maps to the pipeline options (P and M from data.num_identities and
    data.num_instances, the seed from the top level) in one place."""
    config = load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "default.py"))
    config.seed = 3
    config.data.height, config.data.width = H, W
    config.data.num_identities, config.data.num_instances = 2, 4
    config.data.pad, config.data.erasing_fill, config.data.flip_prob = 3, "zero", 0.25
    mapped = pipeline.TrainPipelineConfig.from_run_config(config)
    assert mapped == _cfg(pad=3, erasing_fill="zero", flip_prob=0.25)
    reader = FileImageReader(split.paths)
    got = _all(pipeline.make_train_iterator(split, reader, config, 0))
    _assert_batches_equal(got, _expected_epoch(split, mapped, 0), mapped)


def test_process_shards_concatenate_to_global_batch(split):
    cfg = _cfg()
    reader = FileImageReader(split.paths)
    whole = _all(pipeline.make_train_iterator(split, reader, cfg, 0))
    parts = [_all(pipeline.make_train_iterator(split, reader, cfg, 0, i, 2)) for i in (0, 1)]
    for b, batch in enumerate(whole):
        assert parts[0][b]["images"].shape[0] == cfg.P * cfg.M // 2
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([parts[0][b][key], parts[1][b][key]]), batch[key]
            )


def test_resume_from_state(split):
    cfg = _cfg()
    reader = FileImageReader(split.paths)
    full = _all(pipeline.make_train_iterator(split, reader, cfg, 2))
    assert len(full) >= 3
    iterator = pipeline.make_train_iterator(split, reader, cfg, 2)
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    resumed = pipeline.make_train_iterator(split, reader, cfg, 2)
    resumed.set_state(state)
    _assert_same_batches(_all(resumed), full[1:])


def test_worker_processes_give_identical_batches(split):
    cfg = _cfg(worker_count=2, read_threads=1)
    reader = FileImageReader(split.paths)
    expected = _all(pipeline.make_train_iterator(split, reader, _cfg(), 1))
    iterator = pipeline.make_train_iterator(split, reader, cfg, 1)
    first = [dict(next(iterator)), dict(next(iterator))]
    state = iterator.get_state()
    rest = _all(iterator)
    _assert_same_batches(first + rest, expected)
    resumed = pipeline.make_train_iterator(split, reader, cfg, 1)
    resumed.set_state(state)
    _assert_same_batches(_all(resumed), expected[2:])


def test_eval_order_and_padding(split):
    reader = FileImageReader(split.paths)
    batches = _all(pipeline.make_eval_iterator(split, reader, H, W, batch_size=8))
    n = len(split)
    assert len(batches) == pipeline.eval_num_batches(n, 8) == -(-n // 8)
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(index[:n], np.arange(n))
    assert (index[n:] == -1).all() and not valid[n:].any() and valid[:n].all()
    images = np.concatenate([b["images"] for b in batches])
    for i in (0, n - 1):
        with open(split.paths[i], "rb") as f:
            expected = transforms.eval_transform(image_io.decode_image(f.read()), H, W)
        np.testing.assert_array_equal(images[i], expected)
    assert (images[n:] == 0).all()
    # Two processes: each gets half of every global batch, in order.
    parts = [_all(pipeline.make_eval_iterator(split, reader, H, W, 8, i, 2)) for i in (0, 1)]
    for b, batch in enumerate(batches):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][b]["index"], parts[1][b]["index"]]), batch["index"]
        )


def test_decode_converts_modes_and_names_bad_files(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(gray)
    assert image_io.decode_image(gray.read_bytes(), str(gray)).shape == (5, 4, 3)
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UnreadableImageError, match="truncated.jpg"):
        image_io.decode_image(truncated.read_bytes(), str(truncated))
    with pytest.raises(UnreadableImageError, match="missing.jpg"):
        FileImageReader([str(tmp_path / "missing.jpg")]).read(0)


def _broken_split(split, tmp_path):
    """The split with one file replaced by garbage and one missing."""
    paths = split.paths.tolist()  # a list: the fixed-width str array would truncate
    bad = tmp_path / "0000_c1s1_bad.jpg"
    bad.write_bytes(b"not an image")
    paths[0] = str(bad)
    paths[1] = str(tmp_path / "0000_c1s1_missing.jpg")
    return Split.from_lists(paths, split.pids, split.camids)


def test_unreadable_images_become_invalid_slots(split, tmp_path):
    broken = _broken_split(split, tmp_path)
    reader = FileImageReader(broken.paths)
    cfg = _cfg(read_threads=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _all(pipeline.make_train_iterator(broken, reader, cfg, 0))
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    plan = sampler.identity_batches(broken.pids, cfg.P, cfg.M, cfg.seed, 0)
    bad_slots = np.isin(plan, [0, 1])
    assert len(messages) == bad_slots.sum() > 0
    assert all("0000_c1s1_bad.jpg" in m or "0000_c1s1_missing.jpg" in m for m in messages)
    valid = np.stack([b["valid"] for b in got])
    np.testing.assert_array_equal(valid, (plan >= 0) & ~bad_slots)
    images = np.stack([b["images"] for b in got])
    assert (images[bad_slots] == 0).all()

    with pytest.raises(UnreadableImageError, match="0000_c1s1_(bad|missing).jpg"):
        _all(pipeline.make_train_iterator(broken, reader, _cfg(skip_unreadable=False), 0))
    with pytest.raises(UnreadableImageError, match="0000_c1s1_bad.jpg"):
        _all(pipeline.make_eval_iterator(broken, reader, H, W, 8))


def test_train_batch_spec_is_what_the_iterator_yields(split):
    """The step is compiled for `train_batch_spec` before any batch is read; a batch that
    differed in a key, shape or dtype would be refused by the compiled step."""
    cfg = _cfg()
    spec = pipeline.train_batch_spec(cfg)
    reader = FileImageReader(split.paths)
    for process_count in (1, 2):
        shards = [
            next(iter(pipeline.make_train_iterator(split, reader, cfg, 0, i, process_count)))
            for i in range(process_count)
        ]
        assert set(shards[0]) == set(spec)
        for key, (shape, dtype) in spec.items():
            whole = np.concatenate([s[key] for s in shards])
            assert (whole.shape, whole.dtype) == (shape, dtype), key


@pytest.mark.parametrize("workers", [0, 2])
def test_one_iterator_over_epochs_from_a_mid_epoch_batch(split, workers):
    """An iterator over several epochs (its worker processes kept throughout) yields each
    epoch's batches in turn; ``start_batch`` skips the first epoch's first batches."""
    cfg = _cfg(worker_count=workers, read_threads=1 if workers else 2)
    reader = FileImageReader(split.paths)
    expected = [_expected_epoch(split, cfg, epoch) for epoch in (1, 2, 3)]
    assert len(expected[0]) > 2
    got = _all(pipeline.make_train_iterator(split, reader, cfg, 1, epochs=3, start_batch=2))
    _assert_batches_equal(got, expected[0][2:] + expected[1] + expected[2], cfg)
