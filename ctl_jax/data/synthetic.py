"""A procedurally rendered person re-ID dataset in the exact Market-1501 layout.

    python -m ctl_jax.data.synthetic --output=data/synthetic_reid [--seed=0] [--overwrite]

Writes `bounding_box_train/`, `query/` and `bounding_box_test/` with Market file names
(`0002_c1s1_000451_00.jpg`): 4-digit pid, 1-based camera. The gallery also holds pid
`0000` background/partial-body crops, persons who never appear as queries, and a few junk
images named `-1_c3s1_...jpg`, as Market-1501 does.

Why it is a real retrieval task rather than a colour lookup:
- Clothing colours come from small palettes, so many identities share top and bottom
  colours; they differ in pattern (stripes/checks/logo), body shape, sleeves, trousers vs
  shorts vs skirt, hair, hat, bag side and backpack.
- Appearance depends on the viewpoint: a logo is only visible from the front, a backpack
  hides the torso pattern from the back, a bag changes side when the person turns.
  Each camera has its own viewpoint preferences.
- Each camera has its own textured background, strong colour cast, illumination, blur,
  noise and scale; queries are matched across cameras only, so raw colour histograms are
  a weak cue (see benchmarks/color_histogram_baseline.py).

Every image is drawn from its own random stream seeded by (seed, image key), so the output
is byte-identical for a seed regardless of the number of worker processes.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ctl_jax.errors import (
    DEBUG_HELP,
    OptionError,
    OutputExistsError,
    UserError,
    debug_requested,
    report_user_error,
)

# Shared palettes (RGB in [0, 1]): few colours, so identities collide on colour.
TOP_COLOURS = np.array(
    [
        [0.80, 0.10, 0.10],
        [0.10, 0.15, 0.45],
        [0.92, 0.92, 0.90],
        [0.12, 0.12, 0.12],
        [0.50, 0.50, 0.52],
        [0.15, 0.50, 0.20],
        [0.90, 0.80, 0.20],
    ]
)
BOTTOM_COLOURS = np.array(
    [
        [0.15, 0.20, 0.40],
        [0.10, 0.10, 0.10],
        [0.45, 0.45, 0.47],
        [0.75, 0.68, 0.50],
        [0.40, 0.25, 0.12],
    ]
)
SHOE_COLOURS = np.array([[0.1, 0.1, 0.1], [0.9, 0.9, 0.9], [0.45, 0.3, 0.15], [0.7, 0.1, 0.1]])
HAIR_COLOURS = np.array(
    [[0.08, 0.06, 0.05], [0.35, 0.22, 0.10], [0.75, 0.62, 0.35], [0.55, 0.55, 0.55]]
)
SKIN_COLOURS = np.array([[0.95, 0.80, 0.68], [0.78, 0.58, 0.42], [0.45, 0.30, 0.20]])
ACCESSORY_COLOURS = np.concatenate([TOP_COLOURS, [[0.55, 0.35, 0.20]]])
PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo")
VIEWS = ("front", "back", "left", "right")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _identity(seed: int, pid: int) -> dict:
    """The fixed appearance of person `pid`."""
    r = _rng(seed, 1, pid)
    return dict(
        height=r.uniform(0.82, 0.96),
        width=r.uniform(0.75, 1.3),
        head=r.uniform(0.85, 1.2),
        top=r.integers(len(TOP_COLOURS)),
        bottom=r.integers(len(BOTTOM_COLOURS)),
        shoes=r.integers(len(SHOE_COLOURS)),
        hair=r.integers(len(HAIR_COLOURS)),
        skin=r.integers(len(SKIN_COLOURS)),
        pattern=r.integers(len(PATTERNS)),
        pattern_colour=r.integers(len(TOP_COLOURS)),
        period=r.choice([3.0, 5.0, 8.0]),
        long_sleeves=bool(r.random() < 0.5),
        lower=r.choice(["trousers", "shorts", "skirt"], p=[0.6, 0.2, 0.2]),
        hat=int(r.integers(len(ACCESSORY_COLOURS))) if r.random() < 0.25 else -1,
        bag=int(r.choice([-1, 0, 1], p=[0.5, 0.25, 0.25])),
        bag_colour=r.integers(len(ACCESSORY_COLOURS)),
        backpack=int(r.integers(len(ACCESSORY_COLOURS))) if r.random() < 0.3 else -1,
    )


def _camera(seed: int, cam: int, height: int, width: int, strength: float = 1.0) -> dict:
    """Background texture and imaging conditions of camera `cam` (0-based).

    `strength` scales the colour cast, illumination change and blur (0: neutral cameras).
    """
    r = _rng(seed, 2, cam)
    bh, bw = 2 * height, 2 * width
    y, x = np.mgrid[0:bh, 0:bw].astype(np.float32)
    # Muted backgrounds: a grey level with a tint, so the person carries most of the colour.
    wall, floor = r.uniform(0.2, 0.8, size=(2, 1)) + r.uniform(-0.12, 0.12, size=(2, 3))
    horizon = r.uniform(0.35, 0.65) * bh
    bg = np.where((y < horizon)[..., None], wall, floor)
    # Low-frequency blotches plus a camera-specific structure (tiles, stripes or doors).
    coarse = r.normal(0, 0.12, size=(6, 6, 3))
    blotch = (
        np.asarray(
            Image.fromarray(((coarse + 0.5) * 255).clip(0, 255).astype(np.uint8)).resize(
                (bw, bh), Image.BILINEAR
            ),
            np.float32,
        )
        / 255.0
        - 0.5
    )
    period = r.uniform(6, 20)
    kind = r.integers(3)
    if kind == 0:
        structure = ((x // period + y // period) % 2) * (y >= horizon)
    elif kind == 1:
        structure = (x // period) % 2 * 1.0
    else:
        structure = ((np.abs(x % (4 * period) - 2 * period) < period / 2) & (y < horizon)) * 1.0
    accent = r.uniform(-0.25, 0.25, size=3)
    bg = bg + blotch + structure[..., None] * accent + r.normal(0, 0.03, size=(bh, bw, 3))
    return dict(
        background=bg.astype(np.float32).clip(0, 1),
        cast=np.exp(strength * r.normal(0, 0.18, size=3)).clip(0.7, 1.4),
        illumination=1.0 + strength * (r.uniform(0.65, 1.2) - 1.0),
        blur=strength * r.uniform(0.0, 1.4),
        noise=r.uniform(0.01, 0.05),
        scale=r.uniform(0.82, 1.0),
        views=r.dirichlet([0.7] * 4),
    )


def _draw_person(img, X, Y, ident: dict, view: str, r: np.random.Generator, top_v, scale, cx):
    """Paints one person into `img` (H, W, 3) in place; X, Y are pixel coordinate grids."""
    height = img.shape[0]
    length = ident["height"] * scale * height
    v0 = top_v * height
    side = view in ("left", "right")
    facing = 1.0 if view == "right" else -1.0
    half_w = 0.14 * length * ident["width"] * (0.6 if side else 1.0)
    head_r = 0.06 * length * ident["head"]
    skin = SKIN_COLOURS[ident["skin"]]
    top = TOP_COLOURS[ident["top"]]
    t0, t1 = v0 + 0.15 * length, v0 + 0.53 * length
    knee, ankle, foot = v0 + 0.75 * length, v0 + 0.95 * length, v0 + length
    dx = X - cx
    swing = r.uniform(-0.35, 0.35)
    stride = r.uniform(0.0, 0.25) if side else r.uniform(0.0, 0.06)

    def paint(mask, colour):
        np.copyto(img, np.asarray(colour, np.float32), where=mask[..., None])

    # Legs (two slanted bars), shoes.
    leg_w = 0.055 * length * ident["width"]
    hip_depth = np.clip(Y - t1, 0, None)
    for sign in (-1.0, 1.0):
        offset = (0 if side else sign * 0.45 * half_w) + sign * stride * hip_depth
        leg = (np.abs(dx - offset) < leg_w) & (Y >= t1) & (Y < ankle)
        lower = ident["lower"]
        covered = leg & (Y < (knee if lower == "shorts" else ankle + 1))
        paint(leg, skin)
        if lower != "skirt":
            paint(covered, BOTTOM_COLOURS[ident["bottom"]])
        shoe = np.abs(dx - offset - (facing * 0.3 * leg_w if side else 0)) < 1.3 * leg_w
        paint(shoe & (Y >= ankle) & (Y < foot), SHOE_COLOURS[ident["shoes"]])
    if ident["lower"] == "skirt":
        flare = half_w * (0.85 + 0.5 * (Y - t1) / max(knee - t1, 1))
        paint((np.abs(dx) < flare) & (Y >= t1) & (Y < knee), BOTTOM_COLOURS[ident["bottom"]])

    # Backpack behind the torso in side views.
    if ident["backpack"] >= 0 and side:
        pack = (np.abs(dx + facing * half_w * 1.2) < 0.5 * half_w) & (Y > t0 + 0.02 * length)
        paint(pack & (Y < t0 + 0.3 * length), ACCESSORY_COLOURS[ident["backpack"]])

    # Torso: a trapezoid with a pattern and cylindrical shading.
    width_at = half_w * (1.0 - 0.15 * (Y - t0) / max(t1 - t0, 1))
    torso = (np.abs(dx) < width_at) & (Y >= t0) & (Y < t1)
    pattern = PATTERNS[ident["pattern"]]
    second = TOP_COLOURS[ident["pattern_colour"]]
    if np.allclose(second, top):
        second = 1.0 - top
    period = ident["period"] * scale
    if pattern == "hstripes":
        alt = ((Y - t0) // period) % 2 == 1
    elif pattern == "vstripes":
        alt = ((dx + 100) // period) % 2 == 1
    elif pattern == "checks":
        alt = (((Y - t0) // period) + ((dx + 100) // period)) % 2 == 1
    elif pattern == "logo" and view == "front":
        alt = (np.abs(dx) < 0.4 * half_w) & (np.abs(Y - (t0 + 0.14 * length)) < 0.06 * length)
    else:
        alt = np.zeros_like(torso)
    paint(torso, top)
    paint(torso & alt, second)
    if ident["backpack"] >= 0:
        colour = ACCESSORY_COLOURS[ident["backpack"]]
        if view == "back":
            pack = (np.abs(dx) < 0.8 * half_w) & (Y > t0 + 0.03 * length)
            paint(pack & (Y < t0 + 0.3 * length), colour)
        elif view == "front":
            straps = np.abs(np.abs(dx) - 0.55 * half_w) < max(1.0, 0.08 * half_w)
            paint(torso & straps, colour)

    # Arms: one or two bars beside the torso, swinging; sleeves long or short.
    arm_w = 0.04 * length * ident["width"]
    elbow = t0 + (0.33 if ident["long_sleeves"] else 0.13) * length
    arm_signs = (0.0,) if side else (-1.0, 1.0)  # side view: the near arm over the torso
    for sign in arm_signs:
        base = sign * (half_w + arm_w) if sign else 0.0
        centre = base + swing * (Y - t0) * (1 if sign >= 0 else -1)
        arm = (np.abs(dx - centre) < arm_w) & (Y >= t0 + 0.01 * length)
        arm &= Y < t0 + 0.37 * length
        paint(arm, skin)
        paint(arm & (Y < elbow), top)

    # Shoulder bag at the hip: side flips when seen from the back, hidden behind the body
    # when on the far side in a side view.
    if ident["bag"] >= 0:
        bag_side = 1.0 if ident["bag"] == 1 else -1.0
        if view == "back":
            bag_side = -bag_side
        visible = not side or (bag_side == facing)
        if visible:
            bx = 0.0 if side else bag_side * (half_w + 0.9 * arm_w)
            bag = np.abs(dx - bx - facing * 0.2 * half_w * side) < 0.45 * half_w
            bag &= np.abs(Y - (t1 - 0.02 * length)) < 0.07 * length
            paint(bag, ACCESSORY_COLOURS[ident["bag_colour"]])
            if view != "back":
                strap = np.abs(dx - bx * (Y - t0) / max(t1 - t0, 1)) < 1.0
                strap &= (Y >= t0) & (Y < t1 - 0.06 * length)
                paint(strap, ACCESSORY_COLOURS[ident["bag_colour"]])

    # Head, hair (all of it from the back), hat.
    hy = v0 + 0.07 * length
    head = (dx / (0.85 * head_r)) ** 2 + ((Y - hy) / head_r) ** 2 < 1.0
    paint(head, skin)
    hair = HAIR_COLOURS[ident["hair"]]
    if view == "back":
        paint(head, hair)
    elif side:
        paint(head & ((Y < hy - 0.2 * head_r) | (dx * facing < -0.3 * head_r)), hair)
    else:
        paint(head & (Y < hy - 0.35 * head_r), hair)
    if ident["hat"] >= 0:
        cap = (np.abs(dx) < 1.05 * head_r) & (Y > hy - 1.3 * head_r) & (Y < hy - 0.45 * head_r)
        paint(cap, ACCESSORY_COLOURS[ident["hat"]])

    # Cylindrical shading over the body makes flat colours less flat.
    shade = 1.0 - 0.35 * np.clip(np.abs(dx) / (half_w + 2 * arm_w), 0, 1) ** 2
    body = (Y >= v0) & (Y < foot) & (np.abs(dx) < half_w + 3 * arm_w)
    img[body] *= shade[body][:, None]


def render_image(seed, key, pid_for_look, camera, kind, height, width) -> bytes:
    """Renders one JPEG. kind: 'person', 'background' (pid 0) or 'junk' (pid -1)."""
    r = _rng(seed, 3, *key)
    bg = camera["background"]
    oy = r.integers(0, bg.shape[0] - height + 1)
    ox = r.integers(0, bg.shape[1] - width + 1)
    img = bg[oy : oy + height, ox : ox + width].copy()
    Y, X = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind != "background":
        ident = _identity(seed, pid_for_look)
        view = VIEWS[r.choice(4, p=camera["views"])]
        scale = camera["scale"] * r.uniform(0.92, 1.05)
        top_v = r.uniform(0.0, 0.06)
        cx = width * (0.5 + r.uniform(-0.07, 0.07))
        if kind == "junk":  # a badly placed detection: mostly off-centre or cut off
            cx = width * r.choice([-0.1, 1.1])
            top_v = r.uniform(0.3, 0.6)
        _draw_person(img, X, Y, ident, view, r, top_v, scale, cx)
    if kind == "background" or r.random() < 0.25:
        # Occluder or clutter: a pole, a passer-by's coat, a bench.
        ow = r.uniform(0.15, 0.5) * width
        x0 = r.uniform(-0.2, 0.9) * width
        y0 = r.uniform(0.3, 0.8) * height if kind == "person" else r.uniform(0, 0.6) * height
        occ = (X >= x0) & (X < x0 + ow) & (Y >= y0)
        img[occ] = r.uniform(0.05, 0.95, size=3)
    gain = camera["illumination"] * r.uniform(0.85, 1.15)
    cast = camera["cast"] * np.exp(r.normal(0, 0.05, size=3))
    img = img * gain * cast + r.normal(0, camera["noise"], size=img.shape)
    pil = Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8))
    blur = camera["blur"] * r.uniform(0.7, 1.3)
    if blur > 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _plan(
    seed, num_train_ids, num_test_ids, num_distractors, num_background, num_junk, num_cameras
):
    """List of (split folder, file name, render key, look pid, camera, kind)."""
    r = _rng(seed, 0)
    total_ids = num_train_ids + num_test_ids + num_distractors
    pids = r.permutation(np.arange(1, total_ids + 1))
    train_ids = np.sort(pids[:num_train_ids])
    test_ids = np.sort(pids[num_train_ids : num_train_ids + num_test_ids])
    extra_ids = np.sort(pids[num_train_ids + num_test_ids :])
    items, counter = [], 0

    def add(folder, pid, cam, kind, look=None):
        nonlocal counter
        counter += 1
        label = f"{pid:04d}" if pid >= 0 else "-1"
        name = f"{label}_c{cam + 1}s1_{counter:06d}_00.jpg"
        items.append((folder, name, (counter,), int(pid if look is None else look), cam, kind))

    def cameras_of(rp):
        k = int(rp.choice(np.arange(2, num_cameras + 1)[:5], p=None))
        return np.sort(rp.choice(num_cameras, size=min(k, num_cameras), replace=False))

    for pid in train_ids:
        rp = _rng(seed, 4, pid)
        cams = cameras_of(rp)
        n = int(rp.integers(12, 17))
        per_cam = np.concatenate([cams, rp.choice(cams, size=max(n - len(cams), 0))])
        for cam in np.sort(per_cam):
            add("bounding_box_train", pid, int(cam), "person")
    for pid in test_ids:
        rp = _rng(seed, 4, pid)
        for cam in cameras_of(rp):
            add("query", pid, int(cam), "person")
            for _ in range(int(rp.integers(1, 4))):
                add("bounding_box_test", pid, int(cam), "person")
    for pid in extra_ids:
        rp = _rng(seed, 4, pid)
        for cam in cameras_of(rp):
            for _ in range(int(rp.integers(1, 3))):
                add("bounding_box_test", pid, int(cam), "person")
    for i in range(num_background):
        add("bounding_box_test", 0, int(_rng(seed, 5, i).integers(num_cameras)), "background")
    for i in range(num_junk):
        rj = _rng(seed, 6, i)
        look = int(rj.choice(np.concatenate([test_ids, extra_ids])))
        add("bounding_box_test", -1, int(rj.integers(num_cameras)), "junk", look=look)
    return items


_WORKER: dict = {}


def _init_worker(seed, height, width, cameras, out_dir):
    _WORKER.update(seed=seed, height=height, width=width, cameras=cameras, out_dir=out_dir)


def _render_item(item):
    w = _WORKER
    folder, name, key, look, cam, kind = item
    data = render_image(w["seed"], key, look, w["cameras"][cam], kind, w["height"], w["width"])
    (Path(w["out_dir"]) / folder / name).write_bytes(data)


def generate(
    output_dir,
    seed: int = 0,
    *,
    num_train_ids: int = 100,
    num_test_ids: int = 50,
    num_distractors: int = 30,
    num_background: int = 60,
    num_junk: int = 20,
    num_cameras: int = 6,
    height: int = 128,
    width: int = 64,
    camera_strength: float = 1.0,
    overwrite: bool = False,
    workers: int | None = None,
) -> dict:
    """Writes the synthetic dataset to `output_dir` and returns its statistics.

    num_distractors: identities that appear only in the gallery; num_background: pid 0
    images; num_junk: pid -1 images; camera_strength: scale of the per-camera colour cast,
    illumination change and blur (1: default, 0: neutral cameras, an easier task).
    Raises FileExistsError if `output_dir` is not empty and `overwrite` is False.
    """
    if num_cameras < 2 or num_cameras > 9:
        raise OptionError("num_cameras must be in 2..9 (one digit in Market names)")
    if num_train_ids < 1 or num_test_ids < 1 or height < 16 or width < 8:
        raise OptionError("need at least one train and one test identity and a 16x8 image")
    if num_train_ids + num_test_ids + num_distractors > 9999:
        raise OptionError("at most 9999 identities fit in 4-digit Market pids")
    start = time.perf_counter()
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} is not empty; pass overwrite=True (--overwrite)")
        for folder in ("bounding_box_train", "query", "bounding_box_test"):
            shutil.rmtree(out / folder, ignore_errors=True)
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    cameras = [_camera(seed, c, height, width, camera_strength) for c in range(num_cameras)]
    items = _plan(
        seed, num_train_ids, num_test_ids, num_distractors, num_background, num_junk, num_cameras
    )
    init_args = (seed, height, width, cameras, str(out))
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    if workers > 1 and len(items) > 200:
        # fork is cheap but unsafe once jax (multithreaded) is imported in this process.
        ctx = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
        with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
            pool.map(_render_item, items, chunksize=32)
    else:
        _init_worker(*init_args)
        for item in items:
            _render_item(item)
    stats = {"output": str(out), "seed": seed, "height": height, "width": width}
    for folder, label in (
        ("bounding_box_train", "train"),
        ("query", "query"),
        ("bounding_box_test", "gallery"),
    ):
        split = [i for i in items if i[0] == folder]
        stats[f"{label}_images"] = len(split)
        stats[f"{label}_ids"] = len({i[3] for i in split if i[5] == "person"})
    stats["gallery_background"] = num_background
    stats["gallery_junk"] = num_junk
    stats["cameras"] = num_cameras
    stats["camera_strength"] = camera_strength
    stats["seconds"] = round(time.perf_counter() - start, 2)
    return stats


def save_sample_grid(dataset_dir, out_png, num_ids: int = 6, per_id: int = 6) -> None:
    """Saves a grid: one row per test identity, its query and gallery images by camera."""
    from ctl_jax.data.readers import read_market_style

    ds = read_market_style(dataset_dir, "synthetic")
    paths = np.concatenate([ds.query.paths, ds.gallery.paths])
    pids = np.concatenate([ds.query.pids, ds.gallery.pids])
    cams = np.concatenate([ds.query.camids, ds.gallery.camids])
    rows = []
    for pid in np.unique(ds.query.pids)[:num_ids]:
        idx = np.flatnonzero(pids == pid)
        idx = idx[np.argsort(cams[idx], kind="stable")]
        # Prefer one image per camera, then fill up.
        first = [i for k, i in enumerate(idx) if k == 0 or cams[i] != cams[idx[k - 1]]]
        chosen = (first + [i for i in idx if i not in first])[:per_id]
        rows.append([Image.open(paths[i]).convert("RGB") for i in chosen])
    h, w = rows[0][0].height, rows[0][0].width
    grid = Image.new("RGB", (per_id * (w + 2), len(rows) * (h + 2)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((w, h)), (c * (w + 2), r * (h + 2)))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    grid.quantize(128).save(out_png, optimize=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ctl_jax.data.synthetic",
        description="Write the synthetic person re-ID dataset in the Market-1501 layout.",
    )
    p.add_argument("--output", required=True, help="output folder (must be empty or new)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_train_ids", type=int, default=100)
    p.add_argument("--num_test_ids", type=int, default=50)
    p.add_argument(
        "--num_distractors", type=int, default=30, help="identities that appear only in the gallery"
    )
    p.add_argument("--num_background", type=int, default=60, help="pid 0 gallery images")
    p.add_argument("--num_junk", type=int, default=20, help="pid -1 gallery images")
    p.add_argument("--num_cameras", type=int, default=6)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument(
        "--camera_strength",
        type=float,
        default=1.0,
        help="scale of camera colour cast/illumination/blur (0 = neutral, easier)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--sample_grid", default=None, help="also save a sample grid PNG here")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = p.parse_args(argv)
    try:
        stats = generate(
            args.output,
            args.seed,
            num_train_ids=args.num_train_ids,
            num_test_ids=args.num_test_ids,
            num_distractors=args.num_distractors,
            num_background=args.num_background,
            num_junk=args.num_junk,
            num_cameras=args.num_cameras,
            camera_strength=args.camera_strength,
            height=args.height,
            width=args.width,
            overwrite=args.overwrite,
            workers=args.workers,
        )
    except UserError as e:
        return report_user_error(e, debug_requested(args.debug))
    if args.sample_grid:
        save_sample_grid(args.output, args.sample_grid)
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
