"""`python -m ctl_jax.serve` end to end over HTTP on 127.0.0.1: health, search, embed,
concurrent clients, the 4xx answers, the gallery image route, clean shutdown, and the page
in headless Chromium."""

import concurrent.futures
import io
import json
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from headless_chromium import Browser, find_browser
from PIL import Image
from tiny_model import REPO, random_images, save_random_model

import ctl_jax
from ctl_jax.retrieval.images import embed_images

H, W = 32, 16
LABELS = ("alice", "bob", "carol", "dave")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A model, a folder-per-identity gallery of 8 images and its instance index."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = root / "model"
    save_random_model(model_dir, height=H, width=W)
    images = random_images(len(LABELS) * 2, 64, 32, seed=5)
    paths = []
    for i, image in enumerate(images):
        path = root / "gallery" / LABELS[i // 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(str(path.resolve()))
    embedder = ctl_jax.Embedder.load(model_dir)
    embeddings, _ = embed_images(embedder, root / "gallery", progress=False, identity="folder")
    index_path = root / "index.npz"
    ctl_jax.Index.build(embeddings, kind="instance").save(index_path)
    return {
        "model": model_dir,
        "index": index_path,
        "paths": paths,
        "embedder": embedder,
        "embeddings": embeddings,
    }


def start_server(gallery, *extra):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctl_jax.serve",
            f"--index={gallery['index']}",
            f"--checkpoint={gallery['model']}",
            "--port=0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            line = process.stdout.readline()
            found = re.search(r"on (http://127\.0\.0\.1:\d+)$", line.strip())
            if found:
                return process, found.group(1)
            if not line and process.poll() is not None:
                break
    process.kill()
    raise AssertionError(f"the service did not start: {process.stderr.read()}")


@pytest.fixture(scope="module")
def server(gallery):
    process, url = start_server(gallery, "--max_upload_mb=0.05", "--top_k=3")
    yield url
    if process.poll() is None:
        process.kill()
        process.wait()


def request(url, data=None, content_type=None, method=None):
    """(status, headers, body bytes) of one request."""
    req = urllib.request.Request(url, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post_image(url, path, route="/search"):
    with open(path, "rb") as f:
        status, _, body = request(url + route, f.read(), "image/png")
    assert status == 200, body
    return json.loads(body)


def multipart(field, filename, data, boundary="ctl-jax-test-boundary"):
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_health_search_embed_and_gallery_images(server, gallery):
    status, _, body = request(server + "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["index"] == {"kind": "instance", "method": "exact", "items": 8, "dim": 512}
    assert health["model"]["input_size"] == [H, W] and health["model"]["dim"] == 512

    path = gallery["paths"][3]
    document = post_image(server, path)
    (query,) = document["queries"]
    assert [m["label"] for m in query["matches"]][:1] == ["bob"]
    assert len(query["matches"]) == 3 and document["meta"]["top_k"] == 3
    top = query["matches"][0]
    assert top["path"] == path and top["score"] == pytest.approx(1.0, abs=1e-4)
    # The same document as the search command writes, plus each match's picture URL.
    assert set(top) == {"label", "pid", "path", "score", "image"}
    status, headers, image = request(server + top["image"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert image == open(path, "rb").read()

    with open(path, "rb") as f:
        data = f.read()
    body, content_type = multipart("image", "query.png", data)
    status, _, answer = request(server + "/search?k=5", body, content_type)
    answer = json.loads(answer)
    assert status == 200 and answer["queries"][0]["path"] == "query.png"
    assert len(answer["queries"][0]["matches"]) == 5
    assert answer["queries"][0]["matches"][0]["path"] == path

    embedding = post_image(server, path, "/embed")
    assert embedding["dim"] == 512 and embedding["input_size"] == [H, W]
    want = gallery["embedder"]([Image.open(path)])[0]
    np.testing.assert_allclose(embedding["embedding"], want, rtol=1e-4, atol=1e-4)


def test_centroid_matches_show_their_representative_image(gallery):
    from ctl_jax.deploy.service import SearchService

    index = ctl_jax.Index.build(gallery["embeddings"], kind="centroid")
    service = SearchService(gallery["embedder"], index, top_k=2)
    with open(gallery["paths"][6], "rb") as f:
        document = service.search(f.read(), name="q.png")
    top = document["queries"][0]["matches"][0]
    assert top["label"] == "dave" and top["path"] is None  # a centroid is an identity
    shown = urllib.parse.parse_qs(urllib.parse.urlsplit(top["image"]).query)["path"][0]
    assert shown in gallery["paths"][6:8]


def test_concurrent_clients_each_get_their_own_answer(server, gallery):
    jobs = [(path, route) for path in gallery["paths"] for route in ("/search", "/embed")] * 2
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda job: post_image(server, *job), jobs))
    want = gallery["embedder"](gallery["paths"])
    for (path, route), answer in zip(jobs, answers):
        if route == "/search":
            assert answer["queries"][0]["matches"][0]["path"] == path
        else:
            row = gallery["paths"].index(path)
            np.testing.assert_allclose(answer["embedding"], want[row], rtol=1e-4, atol=1e-4)


def test_bad_requests_get_a_clear_4xx(server, gallery):
    def error(status, url, *args, **kwargs):
        got, headers, body = request(server + url, *args, **kwargs)
        assert got == status, body
        assert headers["Content-Type"] == "application/json"
        return json.loads(body)["error"]

    assert "not a readable image" in error(400, "/search", b"not an image", "image/png")
    assert "not a readable image" in error(400, "/embed", b"\x89PNG\r\n\x1a\n...", "image/png")
    assert "text/plain is not accepted" in error(415, "/search", b"hello", "text/plain")
    # urllib's default for a body: a form, not an image.
    assert "x-www-form-urlencoded is not" in error(415, "/search", b"hello")
    body, content_type = multipart("other", "", b"")
    body = body.replace(b'; filename=""', b"")
    assert "has no file" in error(400, "/search", body, content_type)
    big = io.BytesIO()
    Image.fromarray(random_images(1, 300, 300)[0]).save(big, format="png")
    assert "the limit is 52,428" in error(413, "/search", big.getvalue(), "image/png")
    assert "k must be in 1..8" in error(400, "/search?k=9", b"x", "image/png")
    assert "k must be an integer" in error(400, "/search?k=x", b"x", "image/png")
    # Only the index's own images are served: no other file, however it is named.
    inside = gallery["paths"][0]
    for path in ("/etc/passwd", inside + "/../../../../etc/passwd", str(gallery["index"])):
        query = urllib.parse.urlencode({"path": path})
        assert error(404, f"/image?{query}") == "not an image of the index"
    assert error(404, "/image/../../etc/passwd").startswith("no such page")
    assert error(405, "/search").startswith("/search takes POST")
    assert error(404, "/nowhere").startswith("no such page")


def test_sigterm_shuts_down_cleanly(gallery):
    process, url = start_server(gallery)
    assert request(url + "/health")[0] == 200
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert code == 143, stderr  # 128 + SIGTERM, as every command
    assert "shutting down" in stderr and "Traceback" not in stderr


def test_a_missing_index_is_a_one_line_error(gallery, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctl_jax.serve",
            f"--index={tmp_path / 'missing.npz'}",
            f"--checkpoint={gallery['model']}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "missing.npz" in lines[0], lines


def test_page_in_headless_chromium(server, gallery, tmp_path):
    executable = find_browser()
    if executable is None:
        pytest.skip("no Chromium found (make test installs Debian's chromium when run as root)")
    browser = Browser(executable)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server + "/")
        browser.wait_for("document.getElementById('info').textContent.includes('8 instance')")
        browser.set_files("#file", [gallery["paths"][5]])
        browser.wait_for("document.querySelectorAll('.match').length === 3")
        browser.wait_for(
            "[...document.querySelectorAll('.match img')].every(i => i.complete && "
            "i.naturalWidth > 0) && document.getElementById('query-img').naturalWidth > 0"
        )
        labels = browser.evaluate(
            "[...document.querySelectorAll('.match .label')].map(e => e.textContent)"
        )
        status = browser.evaluate("document.getElementById('status').textContent")
        screenshot = tmp_path / "search_page.png"
        browser.screenshot(screenshot)
    finally:
        browser.close()
    assert labels[0] == "carol" and status == "3 best matches"
    assert screenshot.stat().st_size > 1000
    print(f"screenshot: {screenshot}")
