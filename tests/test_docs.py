"""The documentation against the code: the README's quick start runs as written, the README
names pages that exist, and the accelerator extras ask for the jax version of the CPU install.

`mkdocs build --strict` (broken links and anchors, pages left out of the nav) runs in
`make test` and `make docs`, not here.

The quick-start test runs the README's shell blocks marked `<!-- test: quickstart -->`, in
order, in a temporary folder that links the repository's `configs/` (as if run from the
repository root), with these appended for size, and nothing else changed:
- `ctl_jax.data.synthetic`: the tiny set of tests/tiny_data.py (8 training identities,
  32x16 images) instead of the demo's 100 identities at 64x32;
- `ctl_jax.train` and `ctl_jax.evaluate`: `--config.data.height=32 --config.data.width=16
  --config.data.num_identities=4 --config.solver.num_epochs=1`, and no evaluation inside the
  training (`--config.eval.modes=()`; the evaluate command that follows evaluates);
- `ctl_jax.search`: `--top_k=3` (the tiny gallery has 4 identities, the default is 10 matches);
- `ctl_jax.serve` (the block marked `quickstart serve`): `--port=0` (a free port) and
  `--top_k=3`; it runs in the background, answers one search over HTTP (the README's curl
  line, with k=3), and stops on SIGTERM.
Before the "your own images" block the test fills `photos/gallery/<identity>/` and
`photos/queries/` with images of the generated set, as the README asks the user to.

The Market-1501 and original-weights quick starts are not marked: they need the dataset and
downloaded weights, which CI does not have. Their steps are covered apart (conversion:
tests/test_convert.py; evaluating a checkpoint: tests/test_cli.py), and docs/reproduce.md
gives a synthetic-scale run of the original-weights commands.
"""

from __future__ import annotations

import configparser
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request

from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- test: (quickstart(?: serve)?) -->\s*\n```bash\n(.*?)```", re.S)

SIZE = {
    "ctl_jax.data.synthetic": [
        "--num_train_ids=8",
        "--num_test_ids=4",
        "--num_distractors=2",
        "--num_background=4",
        "--num_junk=2",
        "--num_cameras=3",
        "--height=32",
        "--width=16",
    ],
    "ctl_jax.train": [
        "--config.data.height=32",
        "--config.data.width=16",
        "--config.data.num_identities=4",
        "--config.solver.num_epochs=1",
        "--config.eval.modes=()",
    ],
    "ctl_jax.evaluate": [
        "--config.data.height=32",
        "--config.data.width=16",
        "--config.data.num_identities=4",
        "--config.solver.num_epochs=1",
    ],
    # The tiny gallery has 4 identities, fewer than the default 10 matches per query.
    "ctl_jax.search": ["--top_k=3"],
    "ctl_jax.serve": ["--port=0", "--top_k=3"],
}


def readme_blocks(page: str = "README.md") -> list[tuple[str, list[list[str]]]]:
    """(marker, commands) of each marked block of `page`; a command is its argv,
    continuation lines joined and comments dropped."""
    blocks = []
    for kind, body in MARKER.findall((REPO / page).read_text()):
        text = re.sub(r"\\\n\s*", " ", body)
        lines = [line for line in text.splitlines() if line.strip()]
        commands = [shlex.split(line) for line in lines if not line.startswith("#")]
        blocks.append((kind, commands))
    return blocks


def environment() -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), PYTHONPATH=str(REPO))
    env.setdefault("CTL_JAX_COMPILATION_CACHE", str(REPO / ".cache" / "jax"))
    return env


def module_of(argv: list[str]) -> str:
    assert argv[:2] == ["python", "-m"], f"a quick-start command that is not `python -m`: {argv}"
    return argv[2]


def fill_photos(root: pathlib.Path) -> None:
    """photos/gallery/<identity>/ from the generated gallery (identities with queries, as a
    user's gallery would hold them), photos/queries/ from its query images."""
    data = root / "data" / "synthetic_reid"
    queries = sorted((data / "query").glob("*.jpg"))
    wanted = {q.name.split("_")[0] for q in queries}
    for image in sorted((data / "bounding_box_test").glob("*.jpg")):
        pid = image.name.split("_")[0]
        if pid in wanted:
            (root / "photos" / "gallery" / pid).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, root / "photos" / "gallery" / pid / image.name)
    (root / "photos" / "queries").mkdir(parents=True)
    for image in queries[:6]:
        shutil.copy(image, root / "photos" / "queries" / image.name)


def serve_and_search(argv: list[str], cwd: pathlib.Path, query: pathlib.Path) -> dict:
    """Starts the service, POSTs one photo to /search as the README's curl line does, stops it
    with SIGTERM and returns the answer."""
    process = subprocess.Popen(
        [sys.executable, *argv[1:]],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()  # "serving ... on http://host:port"
        address = re.search(r"on (http://\S+)", line)
        assert address, line + process.stderr.read()
        request = urllib.request.Request(
            address.group(1) + "/search?k=3",
            data=query.read_bytes(),
            headers={"Content-Type": "image/jpeg"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        return answer
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_readme_quickstart_runs_as_written(tmp_path):
    blocks = readme_blocks()
    assert [kind for kind, _ in blocks] == ["quickstart", "quickstart", "quickstart serve"]
    (tmp_path / "configs").symlink_to(REPO / "configs")
    answer = None
    for kind, commands in blocks:
        if any(module_of(argv) == "ctl_jax.embed" for argv in commands):
            fill_photos(tmp_path)
        for argv in commands:
            module = module_of(argv)
            argv = argv + SIZE.get(module, [])
            if kind == "quickstart serve":
                query = sorted((tmp_path / "photos" / "queries").iterdir())[0]
                answer = serve_and_search(argv, tmp_path, query)
                continue
            result = subprocess.run(
                [sys.executable, *argv[1:]],
                cwd=tmp_path,
                env=environment(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout}\n{result.stderr}"
    # What the README says the commands leave behind.
    metrics = json.loads((tmp_path / "runs" / "default" / "metrics.json").read_text())
    assert {"instance", "centroid_camera"} <= set(metrics)
    results = json.loads((tmp_path / "results.json").read_text())
    num_queries = len(list((tmp_path / "photos" / "queries").iterdir()))
    assert len(results["queries"]) == num_queries
    identities = {p.name for p in (tmp_path / "photos" / "gallery").iterdir()}
    for result in results["queries"]:
        assert result["matches"] and {m["label"] for m in result["matches"]} <= identities
    assert len(list((tmp_path / "ranked").glob("*.png"))) == num_queries
    assert answer["queries"][0]["matches"][0]["label"] in identities


def test_getting_started_shows_the_readme_quick_start():
    """The site's Getting started page repeats the README's quick start: the same blocks."""
    assert readme_blocks("docs/getting-started.md") == readme_blocks()


def test_readme_names_pages_that_exist():
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"\]\((docs/[\w./-]+)\)", readme))
    assert len(named) >= 10
    for page in named:
        assert (REPO / page).is_file(), page
    # Every page of docs/ is in the site's navigation (mkdocs --strict checks the links).
    nav = (REPO / "mkdocs.yml").read_text()
    for page in (REPO / "docs").glob("*.md"):
        assert f": {page.name}" in nav, page.name


def test_accelerator_extras_pin_the_cpu_jax_version():
    """Metadata only: nothing is installed. The `cuda12` and `tpu` extras must ask for the
    jax version that constraints.txt pins (the one the tests run), and that jax release must
    offer those extras."""
    from importlib import metadata

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extras = setup["options.extras_require"]
    pins = dict(
        line.split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for extra in ("cuda12", "tpu"):
        requirements = [r.strip() for r in extras[extra].strip().splitlines()]
        assert requirements == [f"jax[{extra}]=={pins['jax']}"], (extra, requirements)
    assert metadata.version("jax") == pins["jax"]
    offered = metadata.metadata("jax").get_all("Provides-Extra")
    assert {"cuda12", "tpu"} <= set(offered)
    # The docs extra is part of the test extra (make test builds the site).
    test_extra = set(extras["test"].split())
    assert set(extras["docs"].split()) <= test_extra


def test_benchmarks_readme_has_one_row_per_script():
    """benchmarks/README.md: a row for every script and a mention of every helper, so a new
    benchmark cannot go unlisted."""
    text = (REPO / "benchmarks" / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)\.py` \|", text, re.M)
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - {"__init__"}
    helpers = {
        "common",
        "tasks",
        "torch_reference",
        "torchvision_chain",
        "reference_evaluation",
        "torch_reference_vit",
        "torch_reference_osnet",
    }
    assert sorted(rows) == sorted(scripts - helpers)
    for helper in helpers:
        assert f"`{helper}.py`" in text
