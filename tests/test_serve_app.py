"""The search service's application in process (Starlette's TestClient, no sockets): routes,
JSON errors, limits, auth, Host check, /image confinement, batching, live updates."""

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import struct
import threading
import time
import urllib.parse
import zlib

import numpy as np
import pytest
from PIL import Image
from serve_gallery import H, W, build_gallery, png_bytes
from starlette.testclient import TestClient
from tiny_model import random_images

import ctl_jax
from ctl_jax.deploy.app import AccessSettings, create_app
from ctl_jax.deploy.index_store import IndexStore, lock_path
from ctl_jax.deploy.metrics import ServiceMetrics
from ctl_jax.deploy.service import SearchService, SearchSettings
from ctl_jax.deploy.uploads import UploadLimits
from ctl_jax.file_lock import exclusive_lock
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.labels import pids_for_labels

TEST_HOSTS = ("testserver",)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return build_gallery(tmp_path_factory.mktemp("serve_app"))


_EMBEDDERS = {}


def embedder(gallery, max_batch):
    if max_batch not in _EMBEDDERS:
        _EMBEDDERS[max_batch] = ctl_jax.Embedder.load(gallery["model"], batch_size=max_batch)
    return _EMBEDDERS[max_batch]


def make_service(gallery, index_path, *, max_batch=8, read_only=False, lock_wait=0.0, **kw):
    store = IndexStore(index_path, read_only=read_only, lock_wait=lock_wait)
    settings = SearchSettings(**kw)
    return SearchService(embedder(gallery, max_batch), store, settings, ServiceMetrics())


@contextlib.contextmanager
def client(gallery, tmp_path, *, index=None, access=None, **kw):
    """(TestClient, service) over a copy of the index (or `index`) in tmp_path."""
    index_path = tmp_path / "index.npz"
    shutil.copy(index or gallery["index"], index_path)
    service = make_service(gallery, index_path, **kw)
    access = access or AccessSettings(allowed_hosts=TEST_HOSTS, access_log=False)
    with TestClient(create_app(service, access, service.metrics)) as test_client:
        yield test_client, service


def read(path):
    with open(path, "rb") as f:
        return f.read()


def relative(gallery, path):
    return os.path.relpath(path, gallery["root"])


def check_error(response, status, text=""):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    assert text in message, message
    return message


def test_search_embed_health_and_pictures(gallery, tmp_path):
    with client(gallery, tmp_path, top_k=3) as (http, _):
        health = http.get("/health").json()
        assert health["index"] == {"kind": "instance", "method": "exact", "items": 8, "dim": 512}
        assert health["model"]["input_size"] == [H, W]
        path = gallery["paths"][3]
        answer = http.post("/search", content=read(path), headers={"content-type": "image/png"})
        matches = answer.json()["queries"][0]["matches"]
        assert len(matches) == 3 and matches[0]["label"] == "bob"
        # Paths relative to the image root; the picture's URL serves the very file.
        assert matches[0]["path"] == relative(gallery, path)
        assert matches[0]["score"] == pytest.approx(1.0, abs=1e-4)
        picture = http.get(matches[0]["image"])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert picture.content == read(path)
        # multipart: the part named "image", whatever comes before it.
        files = {"note": (None, "hello"), "image": ("q.png", read(path), "image/png")}
        answer = http.post("/search?k=5", files=files).json()["queries"][0]
        assert answer["path"] == "q.png" and len(answer["matches"]) == 5
        embedding = http.post(
            "/embed", content=read(path), headers={"content-type": "image/png"}
        ).json()
        want = gallery["embedder"]([Image.open(path)])[0]
        np.testing.assert_allclose(embedding["embedding"], want, rtol=1e-4, atol=1e-4)


def test_absolute_paths_when_asked(gallery, tmp_path):
    with client(gallery, tmp_path, absolute_paths=True) as (http, _):
        path = gallery["paths"][0]
        answer = http.post("/search", content=read(path), headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["queries"][0]["matches"][0]["path"] == path


def test_centroid_matches_show_their_representative_image(gallery, tmp_path):
    index_path = tmp_path / "centroids.npz"
    ctl_jax.Index.build(gallery["embeddings"], kind="centroid").save(index_path)
    with client(gallery, tmp_path, index=index_path, top_k=2) as (http, _):
        answer = http.post(
            "/search", content=read(gallery["paths"][6]), headers={"content-type": "image/png"}
        )
        top = answer.json()["queries"][0]["matches"][0]
        assert top["label"] == "dave" and top["path"] is None
        shown = urllib.parse.parse_qs(urllib.parse.urlsplit(top["image"]).query)["path"][0]
        assert shown in [relative(gallery, p) for p in gallery["paths"][6:8]]


def test_every_error_is_json_and_head_works(gallery, tmp_path):
    limits = UploadLimits(max_bytes=50_000, max_pixels=100 * 100, max_parts=4)
    with client(gallery, tmp_path, limits=limits) as (http, _):
        png = {"content-type": "image/png"}
        check_error(http.post("/search", content=b"not an image", headers=png), 400, "readable")
        check_error(
            http.post("/search", content=b"hello", headers={"content-type": "text/plain"}),
            415,
            "text/plain is not accepted",
        )
        big = png_bytes(random_images(1, 300, 300)[0])
        check_error(http.post("/search", content=big, headers=png), 413, "the limit is 50,000")
        check_error(http.post("/search?k=9", content=b"x", headers=png), 400, "k must be in 1..8")
        check_error(http.post("/search?k=x", content=b"x", headers=png), 400, "k must be an int")
        check_error(http.post("/search", files={"other": (None, "x")}), 400, "has no file")
        check_error(http.get("/search"), 405, "use POST")
        for method in ("PUT", "DELETE", "OPTIONS", "PATCH"):
            check_error(http.request(method, "/health"), 405, "not allowed on /health")
        check_error(http.get("/nowhere"), 404, "no such page")
        check_error(http.delete("/identities/nobody"), 404, "unknown label")
        for route in ("/health", "/", "/openapi.json", "/docs", "/metrics"):
            got, head = http.get(route), http.head(route)
            assert got.status_code == head.status_code == 200 and head.content == b""
            assert head.headers["content-type"] == got.headers["content-type"]


def test_content_length_is_checked_before_the_body(gallery, tmp_path):
    """Bad or too large declared sizes are refused from the header (the body is a stream
    that fails if read)."""

    def body():
        raise AssertionError("the body was read")
        yield b""

    with client(gallery, tmp_path, limits=UploadLimits(max_bytes=1000)) as (http, _):
        for value, status in (("-1", 400), ("-5", 400), ("1e3", 400), ("5000", 413)):
            headers = {"content-type": "image/png", "content-length": value}
            check_error(http.post("/search", content=body(), headers=headers), status)


def png_header_only(width, height):
    """A PNG that declares width x height but holds no pixel data."""
    chunk = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", len(chunk)) + b"IHDR" + chunk
    ihdr += struct.pack(">I", zlib.crc32(b"IHDR" + chunk))
    data = zlib.compress(b"\0" * 64)  # a few rows' worth: the rest is missing
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(data))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixels_are_capped_from_the_header(gallery, tmp_path):
    limits = UploadLimits(max_pixels=200 * 200)
    with client(gallery, tmp_path, limits=limits) as (http, _):
        png = {"content-type": "image/png"}
        # 12000 x 12000 declared: refused as too large, not decoded (it would be a 400:
        # there are no pixels to decode).
        answer = http.post("/search", content=png_header_only(12000, 12000), headers=png)
        check_error(answer, 413, "144,000,000 pixels")
        small = png_bytes(random_images(1, 150, 150)[0])
        assert http.post("/search", content=small, headers=png).status_code == 200


def test_multipart_part_count_is_bounded(gallery, tmp_path):
    with client(gallery, tmp_path, limits=UploadLimits(max_parts=4)) as (http, _):
        fields = {f"f{i}": (None, "x") for i in range(50)}
        fields["image"] = ("q.png", read(gallery["paths"][0]), "image/png")
        check_error(http.post("/search", files=fields), 400, "multipart")
        files = [("images", (f"{i}.png", b"x", "image/png")) for i in range(10)]
        check_error(http.post("/identities?label=x", files=files), 400, "multipart")


def test_token_and_host_checks(gallery, tmp_path):
    access = AccessSettings(
        token="s3cret", allowed_hosts=("testserver", "localhost"), access_log=False
    )
    with client(gallery, tmp_path, access=access) as (http, _):
        assert http.get("/health").status_code == 200  # open: a load balancer's probe
        assert http.get("/").status_code == 200  # the page: no data, asks for the token
        for route in ("/metrics", "/openapi.json", "/image?path=x"):
            answer = http.get(route)
            check_error(answer, 401, "Bearer")
            assert answer.headers["www-authenticate"] == "Bearer"
        check_error(http.get("/metrics", headers={"authorization": "Bearer wrong"}), 401)
        good = {"authorization": "Bearer s3cret"}
        assert http.get("/metrics", headers=good).status_code == 200
        answer = http.post(
            "/search",
            content=read(gallery["paths"][0]),
            headers={**good, "content-type": "image/png"},
        )
        assert answer.status_code == 200
        # DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends its own Host.
        check_error(http.get("/health", headers={"host": "evil.example"}), 400, "Host")
        check_error(http.get("/metrics", headers={**good, "host": "evil.example:80"}), 400)
        assert http.get("/health", headers={"host": "localhost:8080"}).status_code == 200


def test_image_route_serves_only_the_indexed_files(gallery, tmp_path):
    """A gallery file swapped for a symbolic link, an index naming /etc/passwd or another
    file, a path that escapes: all 404."""
    folder = tmp_path / "g"
    shutil.copytree(gallery["root"], folder)
    secret = tmp_path / "secret.png"
    secret.write_bytes(read(gallery["paths"][0]))  # an image, but not the gallery's
    embeddings = gallery["embeddings"]
    paths = [str(folder / relative(gallery, p)) for p in embeddings.paths.tolist()]
    paths[1] = "/etc/passwd"
    paths[2] = str(folder / "alice" / "link.png")
    os.symlink(secret, paths[2])
    changed = Embeddings(
        embeddings.embeddings,
        embeddings.pids,
        embeddings.camids,
        np.asarray(paths),
        embeddings.labels,
    )
    index_path = tmp_path / "odd.npz"
    ctl_jax.Index.build(changed, kind="instance").save(index_path)
    with client(gallery, tmp_path, index=index_path, top_k=8, image_root=str(folder)) as (
        http,
        _,
    ):
        answer = http.post(
            "/search", content=read(gallery["paths"][0]), headers={"content-type": "image/png"}
        ).json()
        shown = {m["path"]: m["image"] for m in answer["queries"][0]["matches"]}
        assert shown["/etc/passwd"] is None and shown["alice/link.png"] is None
        assert http.get(shown["alice/0.png"]).content == read(paths[0])
        # Swapped after loading: the per-request check refuses it.
        victim = folder / "bob" / "3.png"
        victim.unlink()
        os.symlink(secret, victim)
        for path in (
            "bob/3.png",
            "/etc/passwd",
            "alice/link.png",
            "../secret.png",
            str(secret),
            "alice/../../secret.png",
            str(index_path),
        ):
            query = urllib.parse.urlencode({"path": path})
            check_error(http.get(f"/image?{query}"), 404, "not an image of the index")


def run_searches(service, images, k, together=True):
    """Search answers of `images` submitted all at once (or one after the other) to the
    started service."""

    async def main():
        await service.start()
        try:
            if together:
                return await asyncio.gather(*(service.search(i, k) for i in images))
            return [await service.search(i, k) for i in images]
        finally:
            await service.stop()

    return asyncio.run(main())


def test_batched_answers_equal_single_answers(gallery, tmp_path):
    shutil.copy(gallery["index"], tmp_path / "index.npz")
    images = [gallery["embedder"].preprocess(Image.open(p)) for p in gallery["paths"]]
    assert images[0].shape == (H, W, 3)
    batched = make_service(gallery, tmp_path / "index.npz", max_batch=8, batch_wait_seconds=0.2)
    together = run_searches(batched, images, 5)
    registry = batched.metrics.registry
    # The eight requests were answered in fewer model calls than requests.
    assert registry.get_sample_value("ctl_jax_batch_size_sum") == 8
    assert registry.get_sample_value("ctl_jax_batch_size_count") < 8
    for path, answer in zip(gallery["paths"], together):
        assert answer["queries"][0]["matches"][0]["path"] == relative(gallery, path)
    # Alone: one request at a time.
    single = make_service(gallery, tmp_path / "index.npz", max_batch=4)
    alone = run_searches(single, images, 5, together=False)
    assert single.metrics.registry.get_sample_value("ctl_jax_batch_size_count") == 8
    for a, b in zip(together, alone):
        ma, mb = a["queries"][0]["matches"], b["queries"][0]["matches"]
        assert [m["path"] for m in ma] == [m["path"] for m in mb]
        np.testing.assert_allclose([m["score"] for m in ma], [m["score"] for m in mb], atol=1e-5)


def reference_index(gallery, added: dict, removed=(), kind="instance"):
    """Index.build over the gallery's embeddings plus `added` {label: [paths]} minus
    `removed`, embedded independently (the Embedder on the decoded files)."""
    base = gallery["embeddings"]
    vectors, labels = [base.embeddings], [base.labels]
    for label, paths in added.items():
        vectors.append(gallery["embedder"]([Image.open(p) for p in paths]))
        labels.append(np.full(len(paths), label))
    labels = np.concatenate(labels)
    keep = ~np.isin(labels, list(removed))
    vectors = np.concatenate(vectors)[keep]
    labels = labels[keep]
    n = len(labels)
    everything = Embeddings(
        vectors, pids_for_labels(labels), np.full(n, -1, np.int64), np.full(n, ""), labels
    )
    return ctl_jax.Index.build(everything, kind=kind)


@pytest.mark.parametrize("kind", ["instance", "centroid"])
def test_live_updates_equal_a_rebuild_and_persist(gallery, tmp_path, kind):
    index_path = tmp_path / "start.npz"
    ctl_jax.Index.build(gallery["embeddings"], kind=kind).save(index_path)
    extra = gallery["extra"]
    with client(gallery, tmp_path, index=index_path) as (http, service):
        files = [("images", (os.path.basename(p), read(p), "image/png")) for p in extra]
        answer = http.post("/identities?label=erin", files=files)
        assert answer.status_code == 200, answer.text
        grown = 10 if kind == "instance" else 5
        assert answer.json() == {"label": "erin", "added": 2, "items": grown}
        answer = http.post(
            "/identities?label=alice", content=read(extra[0]), headers={"content-type": "image/png"}
        )
        assert answer.json()["items"] == grown + (kind == "instance")
        answer = http.delete("/identities/bob")
        assert answer.json()["items"] == grown + (kind == "instance") - (
            2 if kind == "instance" else 1
        )
        # Searches see the new index: the new identity is found.
        found = http.post(
            "/search?k=1", content=read(extra[1]), headers={"content-type": "image/png"}
        ).json()
        assert found["queries"][0]["matches"][0]["label"] == "erin"
        assert http.get("/health").json()["index"]["items"] == len(service.store.index)
        metrics = http.get("/metrics").text
        assert 'ctl_jax_index_updates_total{operation="add"} 2.0' in metrics
    want = reference_index(gallery, {"erin": extra, "alice": extra[:1]}, ["bob"], kind)
    saved = ctl_jax.Index.load(tmp_path / "index.npz")  # what a restart reads
    order = np.lexsort((np.round(want.vectors[:, 0], 4), want.labels))
    got = np.lexsort((np.round(saved.vectors[:, 0], 4), saved.labels))
    assert saved.labels[got].tolist() == want.labels[order].tolist()
    np.testing.assert_allclose(saved.vectors[got], want.vectors[order], atol=1e-5)
    np.testing.assert_array_equal(saved.items.counts[got], want.items.counts[order])


def test_updates_refused_when_read_only_or_locked(gallery, tmp_path):
    with client(gallery, tmp_path, read_only=True) as (http, _):
        answer = http.post(
            "/identities?label=x",
            content=read(gallery["extra"][0]),
            headers={"content-type": "image/png"},
        )
        check_error(answer, 405, "read-only")
        check_error(http.delete("/identities/alice"), 405, "read-only")
    (tmp_path / "ro").mkdir()
    with client(gallery, tmp_path / "ro", lock_wait=0.2) as (http, service):
        with exclusive_lock(lock_path(service.store.path), command="search --add"):
            answer = http.delete("/identities/alice")
            check_error(answer, 503, "`search --add`")
        assert http.delete("/identities/alice").json()["items"] == 6


def test_openapi_describes_every_route(gallery, tmp_path):
    with client(gallery, tmp_path) as (http, _):
        spec = http.get("/openapi.json").json()
        app = http.app.app  # inside the Guard
        for route in app.routes:
            path = route.path.replace("{label:path}", "{label}")
            methods = {m.lower() for m in route.methods} - {"head"}
            assert methods <= set(spec["paths"][path]), path
        assert "/identities/{label}" in http.get("/docs").text
        text = http.get("/metrics").text
        for name in (
            "ctl_jax_requests_total",
            "ctl_jax_request_seconds_bucket",
            "ctl_jax_batch_size_bucket",
            "ctl_jax_index_items 8.0",
        ):
            assert name in text, name


def test_label_checks(gallery, tmp_path):
    with client(gallery, tmp_path) as (http, _):
        image = {"content": read(gallery["extra"][0]), "headers": {"content-type": "image/png"}}
        check_error(http.post("/identities", **image), 400, "label=NAME")
        check_error(http.post("/identities?label=%0A", **image), 400)
        check_error(http.post("/identities?label=" + "x" * 300, **image), 400, "printable")


def test_batcher_cuts_batches_to_compiled_sizes():
    """17 jobs at once, sizes 1..16 compiled: a batch of 16, then the one left over; each
    job gets its own result; max_batch=1 runs each alone."""
    from ctl_jax.deploy.batching import Batcher

    def run(jobs):
        return [job * 10 for job in jobs]

    async def main(batcher, jobs):
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher(job) for job in jobs))
        finally:
            await batcher.stop()

    seen = []
    batcher = Batcher(run, 32, 0.05, on_batch=seen.append, sizes=[1, 2, 4, 8, 16, 32])
    assert asyncio.run(main(batcher, list(range(17)))) == [10 * i for i in range(17)]
    assert seen == [16, 1]
    seen.clear()
    small = Batcher(run, 32, 0.05, on_batch=seen.append, sizes=[1, 2, 4, 8, 16, 32])
    assert asyncio.run(main(small, [1, 2, 3])) == [10, 20, 30]
    assert seen == [3]  # too small to cut: one call (padded to 4) beats two
    seen.clear()
    alone = Batcher(run, 1, 0.05, on_batch=seen.append, sizes=[1])
    assert asyncio.run(main(alone, [1, 2, 3])) == [10, 20, 30]
    assert seen == [1, 1, 1]


def test_at_most_max_decodes_images_decode_at_once(gallery, tmp_path, monkeypatch):
    from ctl_jax.deploy import uploads

    decode, running, most = uploads.decode_image, [0], [0]
    lock = threading.Lock()

    def counting(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.1)  # long enough for the other requests to arrive
        try:
            return decode(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(uploads, "decode_image", counting)
    with client(gallery, tmp_path, max_decodes=2) as (http, _):
        body = read(gallery["paths"][0])

        def embed(_):
            return http.post("/embed", content=body, headers={"content-type": "image/png"})

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(embed, range(6)))
    assert all(a.status_code == 200 for a in answers)
    assert most[0] == 2


def test_live_updates_of_a_faiss_index_leave_the_served_one_untouched(gallery, tmp_path):
    """faiss changes an index in place: the update works on a copy, so the index searches
    were using is never modified."""
    pytest.importorskip("faiss")
    index_path = tmp_path / "flat.npz"
    ctl_jax.Index.build(gallery["embeddings"], kind="instance", method="flat").save(index_path)
    with client(gallery, tmp_path, index=index_path) as (http, service):
        before = service.store.index
        answer = http.post(
            "/identities?label=erin",
            content=read(gallery["extra"][0]),
            headers={"content-type": "image/png"},
        )
        assert answer.json()["items"] == 9
        assert http.delete("/identities/bob").json()["items"] == 7
        # The index searches held before: still the 8 gallery images, each finding itself.
        _, rows = before.search_rows(gallery["embeddings"].embeddings, 1)
        assert len(before) == 8 and rows[:, 0].tolist() == list(range(8))
    saved = ctl_jax.Index.load(tmp_path / "index.npz")
    assert sorted(saved.labels.tolist()) == [
        "alice",
        "alice",
        "carol",
        "carol",
        "dave",
        "dave",
        "erin",
    ]
