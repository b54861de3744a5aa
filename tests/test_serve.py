"""`python -m ctl_jax.serve` as a process on 127.0.0.1: many clients at once, what a raw
socket can send, client disconnects, SIGTERM with a stalled client, Ctrl-C, a command-line
update while it runs, a restart, and the page in headless Chromium."""

import concurrent.futures
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from headless_chromium import Browser, find_browser
from PIL import Image
from serve_gallery import build_gallery
from tiny_model import REPO

import ctl_jax
from ctl_jax.deploy.index_store import lock_path
from ctl_jax.file_lock import exclusive_lock
from ctl_jax.retrieval.embedding_file import Embeddings


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return build_gallery(tmp_path_factory.mktemp("serve"))


def start_server(gallery, folder, *extra, index=None, env=None):
    """(process, base URL, stderr file) of a service on a free port."""
    stderr = folder / f"stderr{time.monotonic_ns()}.txt"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctl_jax.serve",
            f"--index={index or gallery['index']}",
            f"--checkpoint={gallery['model']}",
            "--port=0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=open(stderr, "w"),
        text=True,
        cwd=REPO,
        env=None if env is None else {**os.environ, **env},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            line = process.stdout.readline()
            found = re.search(r"on (http://127\.0\.0\.1:\d+)$", line.strip())
            if found:
                return process, found.group(1), stderr
            if not line and process.poll() is not None:
                break
    process.kill()
    raise AssertionError(f"the service did not start: {stderr.read_text()}")


def stop(process):
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(gallery, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_logs")
    process, url, stderr = start_server(gallery, folder, "--max_upload_mb=0.05", "--top_k=3")
    yield url, stderr
    stop(process)


def request(url, data=None, content_type=None, method=None):
    """(status, body bytes) of one request."""
    req = urllib.request.Request(url, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_image(url, path, route="/search"):
    with open(path, "rb") as f:
        status, body = request(url + route, f.read(), "image/png")
    assert status == 200, body
    return json.loads(body)


def address(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def raw(url, data, wait=10.0):
    """Everything the server answers to the bytes `data` (until it closes or `wait`)."""
    with socket.create_connection(address(url), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and out.endswith(b"}"):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def test_64_clients_at_once_each_get_their_own_answer(server, gallery):
    url, stderr = server
    jobs = [(path, route) for path in gallery["paths"] for route in ("/search", "/embed")] * 8
    alone = {job: post_image(url, *job) for job in set(jobs)}
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda job: post_image(url, *job), jobs))
    for job, answer in zip(jobs, answers):
        want = alone[job]
        if job[1] == "/search":
            got, expected = answer["queries"][0]["matches"], want["queries"][0]["matches"]
            assert [m["path"] for m in got] == [m["path"] for m in expected]
            assert got[0]["path"].endswith(job[0].rsplit("/", 2)[-1])
            np.testing.assert_allclose(
                [m["score"] for m in got], [m["score"] for m in expected], atol=1e-5
            )
        else:
            # Equal up to float rounding: XLA may sum in another order for another batch size.
            np.testing.assert_allclose(answer["embedding"], want["embedding"], rtol=1e-5, atol=1e-4)
    want = gallery["embedder"]([Image.open(gallery["paths"][0])])[0]
    np.testing.assert_allclose(
        alone[(gallery["paths"][0], "/embed")]["embedding"], want, rtol=1e-4, atol=1e-4
    )


def test_what_a_raw_socket_can_send(server, gallery):
    url, stderr = server
    head = b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
    for length in (b"-1", b"-5", b"abc"):
        answer = raw(url, head + b"Content-Length: " + length + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer
        assert b'"error"' in answer and b"application/json" in answer
    # Over the limit: refused from the header, the 63 MB never sent.
    answer = raw(url, head + b"Content-Length: 66060288\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"the limit is 52,428" in answer, answer
    # Chunked: cut off once over the limit.
    chunk = b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
    answer = raw(url, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    # Clients that go away mid-upload or before the answer: no traceback in the log.
    with socket.create_connection(address(url)) as s:
        s.sendall(head + b"Content-Length: 5000\r\n\r\n" + b"\x89PNG")
    with open(gallery["paths"][0], "rb") as f:
        data = f.read()
    for _ in range(3):
        with socket.create_connection(address(url)) as s:
            s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(data) + data)
    assert request(url + "/health")[0] == 200
    time.sleep(0.5)
    assert "Traceback" not in stderr.read_text()


def stalled_client(url, stop_event):
    """Sends one header byte every half second until told to stop or refused."""
    with socket.create_connection(address(url)) as s:
        for byte in b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000:
            if stop_event.is_set():
                return
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.5)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_it_whatever_clients_do(gallery, tmp_path, signum, code):
    # The token from the environment (the flag's default).
    process, url, stderr = start_server(
        gallery, tmp_path, "--shutdown_timeout=2", env={"CTL_JAX_TOKEN": "t0k"}
    )
    done = threading.Event()
    slow = [threading.Thread(target=stalled_client, args=(url, done)) for _ in range(2)]
    for thread in slow:
        thread.start()
    # And one whose upload stalls after its headers: a request in progress.
    stuck = socket.create_connection(address(url))
    stuck.sendall(
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000\r\n\r\n\x89PNG"
    )
    try:
        time.sleep(1.5)
        assert request(url + "/health")[0] == 200
        assert request(url + "/metrics")[0] == 401
        metrics = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer t0k"})
        with urllib.request.urlopen(metrics, timeout=60) as response:
            assert response.status == 200
        process.send_signal(signum)
        returned = process.wait(timeout=60)
    finally:
        done.set()
        stuck.close()
        stop(process)
        for thread in slow:
            thread.join()
    log = stderr.read_text()
    assert returned == code, log
    assert "shutting down" in log and "Traceback" not in log


def test_updates_with_a_command_line_writer_and_a_restart(gallery, tmp_path):
    index = tmp_path / "index.npz"
    shutil.copy(gallery["index"], index)
    extra = gallery["extra"]
    new = tmp_path / "new.npz"
    vectors = gallery["embedder"]([Image.open(p) for p in extra])
    Embeddings(
        vectors,
        np.zeros(2, np.int64),
        np.full(2, -1, np.int64),
        np.asarray(extra),
        np.asarray(["cli", "cli"]),
    ).save(new)
    process, url, stderr = start_server(gallery, tmp_path, "--lock_wait=0.3", index=index)
    try:
        # Another writer holds the index file: the update is refused, naming it.
        with exclusive_lock(lock_path(index), command="search --add"):
            with open(extra[0], "rb") as f:
                status, body = request(url + "/identities?label=svc", f.read(), "image/png")
            assert status == 503 and b"search --add" in body, body
        # A command-line update while the service runs...
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ctl_jax.search",
                f"--index={index}",
                f"--add={new}",
                f"--save_index={index}",
                "--overwrite",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        # ... is seen by searches, and kept by the service's own update.
        deadline = time.monotonic() + 30
        while json.loads(request(url + "/health")[1])["index"]["items"] != 10:
            assert time.monotonic() < deadline, "the service did not see the new file"
            time.sleep(0.2)
        with open(extra[1], "rb") as f:
            status, body = request(url + "/identities?label=svc", f.read(), "image/png")
        assert status == 200 and json.loads(body)["items"] == 11, body
        status, body = request(url + "/identities/alice", method="DELETE")
        assert status == 200 and json.loads(body)["items"] == 9, body
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143
    finally:
        stop(process)
    saved = ctl_jax.Index.load(index)
    assert sorted(set(saved.labels.tolist())) == ["bob", "carol", "cli", "dave", "svc"]
    # After a restart the service answers from the saved index.
    process, url, stderr = start_server(gallery, tmp_path, index=index)
    try:
        assert json.loads(request(url + "/health")[1])["index"]["items"] == 9
        found = post_image(url, extra[1])["queries"][0]["matches"]
        assert found[0]["label"] in ("cli", "svc") and found[0]["score"] > 0.999
    finally:
        stop(process)


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


def test_keep_alive_connection_serves_several_requests(server, gallery):
    url, _ = server
    connection = http.client.HTTPConnection(*address(url), timeout=60)
    for _ in range(3):
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    connection.close()


def test_page_in_headless_chromium(gallery, tmp_path):
    executable = find_browser()
    if executable is None:
        pytest.skip("no Chromium found (make test installs Debian's chromium when run as root)")
    index = tmp_path / "index.npz"
    shutil.copy(gallery["index"], index)
    process, url, _ = start_server(gallery, tmp_path, "--top_k=3", index=index)
    browser = Browser(executable)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=url + "/")
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
        # Add two images to a new identity from the page.
        browser.evaluate("document.getElementById('label').value = 'erin'")
        browser.set_files("#add-files", gallery["extra"])
        browser.evaluate("document.getElementById('add').click()")
        added = browser.wait_for(
            "document.getElementById('manage-status').textContent.includes('now holds') && "
            "document.getElementById('manage-status').textContent"
        )
        browser.wait_for("document.getElementById('info').textContent.includes('10 instance')")
    finally:
        browser.close()
        stop(process)
    assert labels[0] == "carol" and status == "3 best matches"
    assert added == "added 2 image(s) to erin; the index now holds 10 items"
    assert sorted(set(ctl_jax.Index.load(index).labels.tolist()))[-1] == "erin"
    assert screenshot.stat().st_size > 1000
