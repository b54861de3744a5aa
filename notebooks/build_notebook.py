"""Writes `notebooks/ctl_jax_colab_tpu.ipynb` from the cells below, without outputs.

The notebook is generated so that it stays reviewable and reproducible: edit the cells here,
then run `python notebooks/build_notebook.py` (the test suite checks that the committed file
matches, and executes it in smoke mode).
"""

from __future__ import annotations

import pathlib
import sys

import nbformat

NOTEBOOK = pathlib.Path(__file__).resolve().with_name("ctl_jax_colab_tpu.ipynb")

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """\
# Centroid Triplet Loss re-identification on a Colab TPU with ctl_jax

This notebook trains a [Centroid Triplet Loss](https://arxiv.org/abs/2104.13643) (CTL) model
for person re-identification with **ctl_jax** (JAX/Flax), top to bottom:

1. settings, and installing ctl_jax;
2. the accelerator: every TPU core joins one device mesh;
3. data: the built-in synthetic re-ID set (generated, no download), or Market-1501 from your
   Google Drive;
4. training with the paper's Market-1501 recipe (ResNet-50, 256x128, P=16 identities x M=4
   images per batch, Adam, 120 epochs) in bfloat16, each batch split across all TPU cores;
5. the losses, live in TensorBoard and as curves afterwards;
6. evaluation in every retrieval mode, and pictures of ranked results;
7. exporting the checkpoint and the embeddings.

**Runtime.** *Runtime > Change runtime type > TPU*, then *Runtime > Run all*. On a CPU or GPU
runtime everything works too (slower); training re-runs continue from the last checkpoint.

**Smoke mode.** With the environment variable `CTL_JAX_NOTEBOOK_SMOKE=1` the same cells use
`configs/default.py` shrunk to a tiny synthetic run (32x16 images, ResNet-18, two epochs) that
finishes in a minute or two on a 2-core CPU. The test suite runs the notebook this way.""",
    ),
    (
        "markdown",
        """\
## 1. Settings

`REPO_URL` is only needed when the notebook does not run inside a ctl_jax checkout (on Colab
it never does): the git URL of the ctl_jax repository to clone and install. `DATASET` picks
the data; `MARKET_SOURCE` is the Market-1501 `.zip` as downloaded (or its unpacked folder) in
your Drive. `EPOCHS` is the recipe's 120; fewer give a quicker, weaker model.""",
    ),
    (
        "code",
        """\
import os
import pathlib
import sys

REPO_URL = ""  # @param {type:"string"}
DATASET = "synthetic"  # @param ["synthetic", "market1501"]
MARKET_SOURCE = "/content/drive/MyDrive/Market-1501-v15.09.15.zip"  # @param {type:"string"}
EPOCHS = 120  # @param {type:"integer"}

IN_COLAB = "google.colab" in sys.modules
SMOKE = os.environ.get("CTL_JAX_NOTEBOOK_SMOKE") == "1"
REPO_URL = os.environ.get("CTL_JAX_REPO_URL", REPO_URL)
# Everything this notebook writes goes under WORK. Colab's local disk is fast but temporary:
# section 7 copies the export to Drive.
default_work = "/content/ctl_jax_work" if IN_COLAB else "ctl_jax_work"
WORK = pathlib.Path(os.environ.get("CTL_JAX_NOTEBOOK_WORKDIR", default_work)).resolve()
WORK.mkdir(parents=True, exist_ok=True)
print(f"smoke mode: {SMOKE}, dataset: {DATASET}, work folder: {WORK}")""",
    ),
    (
        "markdown",
        """\
## 2. Install ctl_jax

Inside a checkout (this notebook opened from `notebooks/`) the installed package is used as
is. Otherwise the repository is cloned from `REPO_URL` and installed in editable mode; the
configs (`configs/*.py`) come with the clone. Colab's TPU runtime already has JAX with TPU
support, which pip keeps.""",
    ),
    (
        "code",
        """\
import importlib
import subprocess


def find_checkout():
    \"\"\"The ctl_jax checkout this notebook runs in (cwd or one of its parents), if any.\"\"\"
    for folder in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents):
        if (folder / "ctl_jax" / "__init__.py").is_file() and (folder / "configs").is_dir():
            return folder
    return None


REPO = find_checkout()
if REPO is None:
    if not REPO_URL:
        raise RuntimeError(
            "Not inside a ctl_jax checkout: set REPO_URL (section 1) to the git URL of the "
            "ctl_jax repository, e.g. https://github.com/<you>/ctl_jax.git"
        )
    REPO = WORK / "ctl_jax"
    if not REPO.exists():
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, str(REPO)], check=True)
if importlib.util.find_spec("ctl_jax") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO)], check=True)
    sys.path.insert(0, str(REPO))
    importlib.invalidate_caches()
os.chdir(REPO)  # the configs are read from configs/ of the checkout

import ctl_jax  # noqa: E402

print(f"ctl_jax {ctl_jax.__version__} from {REPO}")""",
    ),
    (
        "markdown",
        """\
## 3. The accelerator

ctl_jax trains data-parallel: one mesh axis `data` over every device; the train state is
replicated and each P x M batch is split along its rows, so every core gets whole identity
groups. `jax.jit` inserts the cross-core reductions itself, so batch-norm statistics,
batch-hard mining and the class centroids all see the global batch, exactly as on one device.
A Colab TPU v2-8 shows 8 cores; newer single-chip runtimes show 1. XLA programs are cached on
disk, so re-running a cell does not compile again.""",
    ),
    (
        "code",
        """\
import jax

from ctl_jax import cli, parallel

cli.enable_compilation_cache()
print(f"python: {sys.executable}")
print(f"jax {jax.__version__}: {jax.device_count()} {jax.default_backend().upper()} device(s)")
for device in jax.devices():
    print("  ", device)
mesh = parallel.make_mesh()
print(f"mesh: {dict(mesh.shape)}")
if jax.default_backend() != "tpu" and not SMOKE:
    print("No TPU here: Runtime > Change runtime type > TPU (or set CTL_JAX_NOTEBOOK_SMOKE=1).")""",
    ),
    (
        "markdown",
        """\
## 4. Data

**Synthetic** (default): a generated re-ID set in the Market-1501 layout (identities with a
colour pattern, several cameras with their own colour cast, distractors, junk images); it
takes seconds and needs no download.

**Market-1501**: put `Market-1501-v15.09.15.zip` (or the unpacked folder) in your Google
Drive and set `DATASET = "market1501"`. The cell mounts Drive and unpacks or copies it to the
local disk, because reading 30,000 small files through the Drive mount is slow.""",
    ),
    (
        "code",
        """\
import shutil
import zipfile

from ctl_jax.data import synthetic


def market_folder(parent: pathlib.Path):
    \"\"\"The folder under `parent` holding bounding_box_train/, query/, bounding_box_test/.\"\"\"
    for folder in sorted(parent.rglob("bounding_box_train")):
        if (folder.parent / "query").is_dir() and (folder.parent / "bounding_box_test").is_dir():
            return folder.parent
    return None


if DATASET == "synthetic":
    DATA_ROOT = WORK / "data" / ("synthetic_smoke" if SMOKE else "synthetic_reid")
    if not (DATA_ROOT / "query").is_dir():
        sizes = {}
        if SMOKE:
            sizes = dict(num_train_ids=8, num_test_ids=4, num_distractors=2, num_background=4,
                         num_junk=2, num_cameras=3, height=64, width=32)
        synthetic.generate(DATA_ROOT, seed=0, overwrite=True, **sizes)
elif DATASET == "market1501":
    if IN_COLAB:
        from google.colab import drive

        drive.mount("/content/drive")
    source, local = pathlib.Path(MARKET_SOURCE), WORK / "data" / "market1501_local"
    DATA_ROOT = market_folder(local) if local.is_dir() else None
    if DATA_ROOT is None:
        if not source.exists():
            raise FileNotFoundError(f"MARKET_SOURCE={source} does not exist")
        if source.suffix == ".zip":
            print(f"unpacking {source} ...")
            with zipfile.ZipFile(source) as archive:
                archive.extractall(local)
        else:
            print(f"copying {source} ...")
            shutil.copytree(source, local / source.name)
        DATA_ROOT = market_folder(local)
        if DATA_ROOT is None:
            raise FileNotFoundError(f"no Market-1501 split folders in {source}")
else:
    raise ValueError(f"DATASET must be 'synthetic' or 'market1501', got {DATASET!r}")
print(f"dataset folder: {DATA_ROOT}")""",
    ),
    (
        "markdown",
        """\
A few training images, one row per identity (Market-style names: `<identity>_c<camera>...`):""",
    ),
    (
        "code",
        """\
from IPython.display import display
from PIL import Image

train_files = sorted((DATA_ROOT / "bounding_box_train").glob("*.jpg"))
by_identity = {}
for path in train_files:
    by_identity.setdefault(path.name.split("_")[0], []).append(path)
rows = [paths[:6] for paths in list(by_identity.values())[:4]]
cell_w, cell_h = 64, 128
grid = Image.new("RGB", (6 * cell_w, len(rows) * cell_h), "white")
for r, paths in enumerate(rows):
    for c, path in enumerate(paths):
        image = Image.open(path).convert("RGB").resize((cell_w, cell_h))
        grid.paste(image, (c * cell_w, r * cell_h))
print(f"{len(train_files)} training images of {len(by_identity)} identities")
display(grid)""",
    ),
    (
        "markdown",
        """\
## 5. The training recipe

`configs/market1501.py` is the paper's CTL-S-R50 recipe. Here it runs in **bfloat16**
(`model.dtype`: bf16 compute, float32 parameters and optimiser), the native TPU format.
The global batch P x M = 64 is split over the cores; P must be divisible by the number of
devices (16 identities: 1, 2, 4, 8 or 16 cores). The recipe starts from ImageNet weights:
torchvision's ResNet-50 is downloaded and converted (no PyTorch needed). In smoke mode the
tiny run starts from random weights.""",
    ),
    (
        "code",
        """\
import urllib.request

from ctl_jax.configs import load_config
from ctl_jax.evaluation import MODES

if SMOKE:
    config = load_config("configs/default.py")
    config.name = "notebook_smoke"
    config.data.height, config.data.width = 32, 16
    config.data.num_identities, config.data.num_instances = 4, 4
    config.data.pad = 2
    config.solver.num_epochs = 2
    config.solver.warmup_epochs, config.solver.milestones = 1, (2,)
    config.train.log_every_steps = 1
else:
    config = load_config("configs/market1501.py")
    config.name = f"market_recipe_{DATASET}"
    config.model.dtype = "bfloat16"
    config.solver.num_epochs = EPOCHS
    weights = WORK / "resnet50-19c8e357.pth"
    imagenet = WORK / "resnet50_imagenet"
    if not (imagenet / "checkpoints").is_dir():
        if not weights.exists():
            url = "https://download.pytorch.org/models/resnet50-19c8e357.pth"
            print(f"downloading {url} ...")
            urllib.request.urlretrieve(url, weights)
        # A separate process on the CPU: the TPU belongs to this notebook's process.
        convert = ["-m", "ctl_jax.convert", f"--source={weights}", f"--output={imagenet}"]
        subprocess.run(
            [sys.executable, *convert],
            check=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    config.model.init_checkpoint = str(imagenet)
config.data.name = DATASET
config.data.root = str(DATA_ROOT)
config.eval.modes = MODES  # evaluate in every mode at the end of training
RUN_DIR = WORK / "runs" / config.name
parallel.check_batch_layout(config.data.num_identities, config.data.num_instances, mesh)
print(f"{config.model.arch} {config.model.dtype}, {config.data.height}x{config.data.width}, "
      f"P={config.data.num_identities} x M={config.data.num_instances}, "
      f"{config.solver.num_epochs} epochs -> {RUN_DIR}")""",
    ),
    (
        "markdown",
        """\
## 6. Train

Run the TensorBoard cell first on Colab to watch the losses while the training cell runs
(it refreshes every 30 s). Training writes to `RUN_DIR`: checkpoints (the latest two and the
best), `metrics.jsonl`, TensorBoard events and `config.json`. The *interrupt* button saves a
checkpoint before stopping; running the cell again resumes exactly where it stopped, input
pipeline position included. Evaluation runs every `train.eval_every_epochs` epochs and at
the end.""",
    ),
    (
        "code",
        """\
if IN_COLAB:
    get_ipython().run_line_magic("load_ext", "tensorboard")
    get_ipython().run_line_magic("tensorboard", f"--logdir {RUN_DIR / 'tensorboard'}")
else:
    print(f"TensorBoard: tensorboard --logdir {RUN_DIR / 'tensorboard'}")""",
    ),
    (
        "code",
        """\
import time

from ctl_jax.evaluation import format_table
from ctl_jax.training.loop import train_and_evaluate

start = time.time()
final_results = train_and_evaluate(config, RUN_DIR)
print(f"done in {time.time() - start:.0f} s")""",
    ),
    (
        "markdown",
        """\
### The losses

`metrics.jsonl` holds one line per logged step: the total loss and its parts (batch-hard
triplet, centroid triplet, label-smoothed cross-entropy, center loss), the mean
anchor-positive / anchor-negative distances, the learning rate and the gradient norm.""",
    ),
    (
        "code",
        """\
import json

import numpy as np

records = [json.loads(line) for line in (RUN_DIR / "metrics.jsonl").read_text().splitlines()]
train_records = [r for r in records if r["kind"] == "train"]
keys = ["total_loss", "triplet_loss", "centroid_loss", "ce_loss", "dist_ap", "dist_an"]
print("epoch  " + "  ".join(f"{k:>13}" for k in keys))
for epoch in sorted({r["epoch"] for r in train_records}):
    rows = [r for r in train_records if r["epoch"] == epoch]
    print(f"{epoch:5d}  " + "  ".join(f"{np.mean([r[k] for r in rows]):13.4f}" for k in keys))
try:
    import matplotlib.pyplot as plt
except ImportError:  # not needed for anything else; Colab has it
    plt = None
if plt is not None:
    steps = [r["step"] for r in train_records]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    for k in keys[:4]:
        axes[0].plot(steps, [r[k] for r in train_records], label=k)
    for k in keys[4:]:
        axes[1].plot(steps, [r[k] for r in train_records], label=k)
    for ax, title in zip(axes, ("losses", "mean distances")):
        ax.set_xlabel("step"), ax.set_title(title), ax.legend()
    plt.show()""",
    ),
    (
        "markdown",
        """\
## 7. Evaluate in every mode

The model is rebuilt from the checkpoint alone (as `python -m ctl_jax.evaluate` does), query
and gallery are embedded on all cores, and retrieval is scored four ways:

- `instance`: each query against every gallery image;
- `centroid`: against one centroid per gallery identity (the mean of its embeddings);
- `centroid_camera`: centroids built without the query's own camera (the paper's protocol);
- `centroid_camera_reference`: the same, as the original code computes it.""",
    ),
    (
        "code",
        """\
from ctl_jax import evaluation
from ctl_jax.checkpoints import restore_model
from ctl_jax.data.source import load_dataset
from ctl_jax.evaluator import Evaluator
from ctl_jax.retrieval.embedding_file import Embeddings

restored = restore_model(RUN_DIR)
dataset, readers = load_dataset(restored.config.data)
evaluator = Evaluator(restored.model, dataset, readers, restored.config, mesh)
query_emb, gallery_emb = evaluator.embeddings(restored.variables)
q, g = dataset.query, dataset.gallery
results = evaluation.evaluate(
    query_emb, q.pids, q.camids, gallery_emb, g.pids, g.camids, modes=MODES
)
print(f"checkpoint step {restored.step}")
print(format_table(results))
meta = {"config": restored.config.name, "step": restored.step, "dataset": DATASET}
evaluation.write_metrics_json(RUN_DIR / "metrics.json", results, meta=meta, overwrite=True)
query = Embeddings(query_emb, q.pids, q.camids, q.paths)
gallery = Embeddings(gallery_emb, g.pids, g.camids, g.paths)""",
    ),
    (
        "markdown",
        """\
### Ranked results

For a few queries: the query (blue frame) and its top 10 matches, green when the identity is
right, red when wrong, with the cosine similarity. First against gallery images, then against
identity centroids (each drawn with the image closest to its centroid, and its image count).""",
    ),
    (
        "code",
        """\
from IPython.display import Image as ShowImage

from ctl_jax.retrieval.index import ExactIndex
from ctl_jax.retrieval.visualize import write_strips

shown = query.select(np.flatnonzero(query.pids > 0)[:: max(1, len(query) // 4)][:4])
for centroids in (False, True):
    index, _ = ExactIndex.from_embeddings(gallery, centroids=centroids)
    scores, rows = index.search(shown.embeddings, k=min(10, len(index)))
    folder = RUN_DIR / "ranked" / ("centroids" if centroids else "images")
    files = write_strips(folder, shown.paths, shown.pids, rows, scores, index.items,
                         overwrite=True, progress=False)
    print("against identity centroids:" if centroids else "against gallery images:")
    for path in files:
        display(ShowImage(filename=str(path)))""",
    ),
    (
        "markdown",
        """\
## 8. Save and export

The export folder holds everything needed later, anywhere (no TPU needed): an inference
checkpoint of the evaluated step (weights, batch-norm statistics and the model settings,
without the optimiser state that only resuming needs; the same format `ctl_jax.convert`
writes), `config.json`, `metrics.json`, and the query and gallery embeddings as `.npz`
(docs/formats.md). It is checked by loading it back. To resume training elsewhere, copy
the whole `RUN_DIR` instead.
Use it with the command-line tools, e.g.

    python -m ctl_jax.evaluate --workdir=export
    python -m ctl_jax.embed --workdir=export --images=photos/ --output=photos.npz
    python -m ctl_jax.search --gallery=export/gallery.npz --centroids \\
        --images=photos/ --workdir=export --output=hits.json

On Colab the zip is also copied to Drive (`MyDrive/ctl_jax_exports/`) when Drive is mounted.""",
    ),
    (
        "code",
        """\
from ctl_jax.checkpoints import CheckpointStore

EXPORT = WORK / "export" / config.name
if EXPORT.exists():
    shutil.rmtree(EXPORT)
meta = CheckpointStore(RUN_DIR, read_only=True).read_meta(restored.step)  # config, classes
store = CheckpointStore(EXPORT, keep=1)
store.save(restored.step, dict(restored.variables), {}, meta)
store.close()
for name in ("config.json", "metrics.json", "metrics.jsonl"):
    shutil.copy2(RUN_DIR / name, EXPORT / name)
query.save(EXPORT / "query.npz")
gallery.save(EXPORT / "gallery.npz")

check = restore_model(EXPORT)  # the export alone rebuilds the same model
for a, b in zip(jax.tree.leaves(check.variables), jax.tree.leaves(restored.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
assert np.array_equal(Embeddings.load(EXPORT / "query.npz").embeddings, query_emb)
archive = shutil.make_archive(str(EXPORT), "zip", EXPORT)
print(f"export: {EXPORT} ({os.path.getsize(archive) / 1e6:.1f} MB zipped: {archive})")
if IN_COLAB and pathlib.Path("/content/drive/MyDrive").is_dir():
    target = pathlib.Path("/content/drive/MyDrive/ctl_jax_exports")
    target.mkdir(exist_ok=True)
    shutil.copy2(archive, target)
    print(f"copied to {target}")""",
    ),
    (
        "markdown",
        """\
## Next steps

- The same training from a terminal: `python -m ctl_jax.train --config=configs/market1501.py
  --config.model.dtype=bfloat16 --workdir=runs/market`.
- Bigger than one TPU host (a TPU pod slice, several GPU nodes): docs/training.md,
  *Multi-host training*; each host runs the same command with `CTL_JAX_DISTRIBUTED=auto`.""",
    ),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs or execution counts."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "accelerator": "TPU",
        "colab": {"provenance": [], "toc_visible": True},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source) in enumerate(CELLS):
        cell = (nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell)(
            source
        )
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding changes nothing
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build(), version=4)


def main(argv: list[str]) -> int:
    """`python notebooks/build_notebook.py [--check]`: write the notebook, or check it."""
    text = render()
    if "--check" in argv:
        if not NOTEBOOK.exists() or NOTEBOOK.read_text() != text:
            print(f"{NOTEBOOK} is out of date: run python {pathlib.Path(__file__).name}")
            return 1
        return 0
    NOTEBOOK.write_text(text)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
