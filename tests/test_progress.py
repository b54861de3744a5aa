"""Progress bars are drawn only on a terminal: redirected output holds no carriage-return
frames, and a table never shares a line with a bar."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from test_cli import REPO
from test_search import clustered

from ctl_jax.progress import progress_bar
from ctl_jax.retrieval.embedding_file import Embeddings


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_are_drawn_only_on_a_terminal():
    for stream, enabled, drawn in [
        (_Terminal(), True, True),
        (io.StringIO(), True, False),  # a file or a pipe
        (_Terminal(), False, False),  # --noprogress, or not process 0
    ]:
        assert list(progress_bar(range(5), enabled=enabled, file=stream, desc="x")) == list(
            range(5)
        )
        assert ("\r" in stream.getvalue()) is drawn, stream.getvalue()


def test_a_redirected_command_writes_no_bar_frames(tmp_path):
    gallery = clustered(30, 6, 32, seed=9)
    gallery = Embeddings(
        gallery.embeddings, gallery.pids, gallery.camids, [str(tmp_path / p) for p in gallery.paths]
    )
    gallery.save(tmp_path / "g.npz")
    clustered(30, 1, 32, seed=9).save(tmp_path / "q.npz")
    log = tmp_path / "run.log"
    # Progress is on (the default); stdout and stderr go to one file, as `> run.log 2>&1`.
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "ctl_jax.search", f"--gallery={tmp_path / 'g.npz'}"]
            + [f"--query={tmp_path / 'q.npz'}", "--top_k=5", f"--visualize={tmp_path / 'vis'}"],
            cwd=REPO,
            env=dict(os.environ, CTL_JAX_COMPILATION_CACHE=str(REPO / ".cache" / "jax")),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert len(list((tmp_path / "vis").glob("*.png"))) == 30  # the drawing loop ran
    assert "\r" not in text and "drawing" not in text, text
