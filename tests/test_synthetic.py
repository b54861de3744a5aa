"""The synthetic re-ID dataset: layout, determinism and Market-style protocol properties."""

import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from ctl_jax.data import synthetic
from ctl_jax.data.readers import MARKET_NAME_PATTERN, read_market_style

TINY = dict(
    num_train_ids=6,
    num_test_ids=5,
    num_distractors=2,
    num_background=3,
    num_junk=2,
    num_cameras=4,
    height=32,
    width=16,
    workers=1,
)
FOLDERS = ("bounding_box_train", "query", "bounding_box_test")


def _digest(root):
    files = sorted(p for f in FOLDERS for p in (root / f).iterdir())
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    stats = synthetic.generate(root, seed=3, **TINY)
    return root, stats


def test_deterministic_for_a_seed(tiny, tmp_path):
    root, _ = tiny
    synthetic.generate(tmp_path / "again", seed=3, **TINY)
    assert _digest(tmp_path / "again") == _digest(root)
    synthetic.generate(tmp_path / "other", seed=4, **TINY)
    assert _digest(tmp_path / "other") != _digest(root)


def test_market_layout_and_names(tiny):
    root, stats = tiny
    name_rule = re.compile(r"^(-1|\d{4})_c[1-4]s1_\d{6}_00\.jpg$")
    for folder in FOLDERS:
        names = [p.name for p in (root / folder).iterdir()]
        assert names and all(name_rule.match(n) and MARKET_NAME_PATTERN.search(n) for n in names)
    gallery = [p.name for p in (root / "bounding_box_test").iterdir()]
    assert sum(n.startswith("-1_") for n in gallery) == TINY["num_junk"]
    assert sum(n.startswith("0000_") for n in gallery) == TINY["num_background"]
    with Image.open(next((root / "query").iterdir())) as im:
        assert im.size == (16, 32)  # h = 2w
    assert stats["train_ids"] == 6 and stats["query_ids"] == 5


def test_protocol_properties(tiny):
    root, _ = tiny
    ds = read_market_style(root, "synthetic")
    raw_train = {int(p.rsplit("/", 1)[1][:4]) for p in ds.train.paths}
    assert raw_train.isdisjoint(set(ds.query.pids) | set(ds.gallery.pids))
    assert ds.num_classes == 6
    # Every query has a gallery match from another camera.
    for pid, cam in zip(ds.query.pids, ds.query.camids):
        same = ds.gallery.pids == pid
        assert np.any(same & (ds.gallery.camids != cam))
    # Distractor persons: gallery pids that never query.
    extra = set(ds.gallery.pids) - set(ds.query.pids) - {0}
    assert len(extra) == TINY["num_distractors"]


def test_refuses_non_empty_output(tiny, tmp_path, capsys):
    root, _ = tiny
    with pytest.raises(FileExistsError):
        synthetic.generate(root, seed=3, **TINY)
    assert synthetic.main([f"--output={root}", "--num_train_ids=2"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert synthetic.main([f"--output={root}", "--num_train_ids=2", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "OutputExistsError" in err
    assert err.strip().splitlines()[-1].startswith(f"error: {root} is not empty")


def test_cli_and_sample_grid(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [f"--{k}={v}" for k, v in TINY.items()]
    assert synthetic.main([f"--output={out}", "--seed=1", *args]) == 0
    assert '"query_ids": 5' in capsys.readouterr().out
    png = tmp_path / "grid.png"
    synthetic.save_sample_grid(out, png, num_ids=3, per_id=4)
    with Image.open(png) as im:
        assert im.size == (4 * 18, 3 * 34)
