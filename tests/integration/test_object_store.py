"""The object store of the transfer tests works: Debian's nginx (tests/object_store.py) started here, WebDAV PUT,
Range GETs, body limits, its access log, and the proxy that cuts a download so the client must resume."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import httpx
import pytest

from tests.object_store import CuttingProxy, NginxObjectStore


@pytest.fixture
def store(tmp_path):
    with NginxObjectStore(tmp_path / "store", max_body_size=32 << 20, slow_rate=256 * 1024) as store:
        yield store


@pytest.fixture
def client():
    with httpx.Client(timeout=30) as client:
        yield client


def test_starts_fast_and_stops_cleanly(tmp_path):
    store = NginxObjectStore(tmp_path / "s")
    started = time.monotonic()
    store.start()
    elapsed = time.monotonic() - started
    port = store.port
    assert store.running and elapsed < 5, f"nginx took {elapsed:.2f}s to start"
    assert httpx.get(store.url("missing")).status_code == 404
    store.stop()
    store.stop()  # idempotent
    assert not store.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert (tmp_path / "s" / "error.log").exists(), "a given workdir is left in place"


def test_a_bad_config_fails_naming_the_error_log(tmp_path):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)nginx did not start.*unknown directive \"no_such_directive\""):
        NginxObjectStore(tmp_path, extra_server_config="no_such_directive on;", start=True)
    assert time.monotonic() - started < 5


def test_put_then_get_round_trip_of_20_mb(store, client):
    data = os.urandom(20 << 20)
    created = client.put(store.url("jobs/j1/out/model.bin"), content=data)  # parents are created
    assert created.status_code == 201
    assert store.read("jobs/j1/out/model.bin") == data
    assert (store.path("jobs/j1/out/model.bin").stat().st_mode & 0o777) == 0o644
    replaced = client.put(store.url("jobs/j1/out/model.bin"), content=data)
    assert replaced.status_code == 204  # nginx: 204 when the file existed, 201 when it did not

    fetched = client.get(store.url("jobs/j1/out/model.bin"))
    assert fetched.status_code == 200
    assert fetched.headers["accept-ranges"] == "bytes"
    assert int(fetched.headers["content-length"]) == len(data)
    assert hashlib.sha256(fetched.content).digest() == hashlib.sha256(data).digest()

    puts = store.wait_requests(2, "jobs/j1/out/model.bin", "PUT")
    assert [p["status"] for p in puts] == [201, 204]
    assert all(p["request_length"] > len(data) for p in puts)
    gets = store.wait_requests(1, "jobs/j1/out/model.bin", "GET")
    assert len(gets) == 1 and gets[0]["body_bytes_sent"] == len(data)


def test_chunked_put_is_accepted(store, client):
    def chunks():
        for _ in range(4):
            yield b"x" * 100_000

    assert client.put(store.url("chunked.bin"), content=chunks()).status_code == 201
    assert store.read("chunked.bin") == b"x" * 400_000


def test_range_requests(store, client):
    data = bytes(range(256)) * 4096  # 1 MiB
    store.put("in/data.bin", data)

    tail = client.get(store.url("in/data.bin"), headers={"Range": "bytes=1000-"})
    assert tail.status_code == 206
    assert tail.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert tail.content == data[1000:]

    middle = client.get(store.url("in/data.bin"), headers={"Range": "bytes=10-19"})
    assert middle.status_code == 206 and middle.content == data[10:20]

    # From the end or past it: 416, with the size in Content-Range.
    for start in (len(data), len(data) + 10):
        beyond = client.get(store.url("in/data.bin"), headers={"Range": f"bytes={start}-"})
        assert beyond.status_code == 416
        assert beyond.headers["content-range"] == f"bytes */{len(data)}"

    logged = store.wait_requests(4, "in/data.bin", "GET")
    assert [e["range"] for e in logged] == ["bytes=1000-", "bytes=10-19", f"bytes={len(data)}-",
                                            f"bytes={len(data) + 10}-"]
    assert [e["status"] for e in logged] == [206, 206, 416, 416]


def test_put_over_the_body_limit_is_413(tmp_path, client):
    with NginxObjectStore(tmp_path / "small", max_body_size=1 << 20) as small:
        assert client.put(small.url("ok.bin"), content=b"a" * (1 << 20)).status_code == 201
        too_big = client.put(small.url("big.bin"), content=b"a" * (3 << 20))
        assert too_big.status_code == 413
        assert not small.exists("big.bin")
        assert [e["status"] for e in small.wait_requests(2, method="PUT")] == [201, 413]
        assert "client intended to send too large body" in small.error_log_text()


def test_access_log_counts_and_query_strings(store, client):
    store.put("a.txt", b"alpha")
    store.mark()  # forget whatever came before
    assert client.get(store.url("a.txt", {"X-Amz-Expires": "60", "X-Amz-Signature": "abc"})).content == b"alpha"
    assert client.get(store.url("a.txt")).status_code == 200
    assert client.put(store.url("b.txt"), content=b"beta").status_code == 201
    assert client.get(store.url("nope.txt")).status_code == 404

    assert len(store.wait_requests(4)) == 4
    gets = store.requests("a.txt", "GET")
    assert len(gets) == 2
    assert gets[0]["args"] == "X-Amz-Expires=60&X-Amz-Signature=abc"
    assert gets[0]["request_uri"] == "/a.txt?X-Amz-Expires=60&X-Amz-Signature=abc"
    assert len(store.requests("/b.txt", "PUT")) == 1 and store.requests("b.txt", "GET") == []
    assert store.requests("nope.txt")[0]["status"] == 404
    store.mark()
    assert store.requests() == []


def test_status_locations(store, client):
    for code in (404, 500, 413, 503, 429, 403):
        assert client.get(store.status_url(code)).status_code == code
        assert client.put(store.status_url(code), content=b"x").status_code == code
    assert client.get(store.status_url(204)).status_code == 204


def test_signed_and_redirect_locations(store, client):
    store.put("s/obj", b"signed")
    assert client.get(store.signed_url("s/obj", expires="123")).content == b"signed"
    assert client.get(store.signed_url("s/obj", sig="wrong")).status_code == 403
    assert client.put(store.signed_url("s/up"), content=b"u").status_code == 201
    assert client.put(store.signed_url("s/up2", sig="wrong"), content=b"u").status_code == 403
    assert store.read("s/up") == b"u" and not store.exists("s/up2")
    moved = client.get(store.redirect_url("s/obj"))
    assert moved.status_code == 302 and moved.headers["location"] == "/s/obj"
    assert client.get(store.redirect_url("s/obj"), follow_redirects=True).content == b"signed"


def test_slow_location_throttles_and_a_cancel_is_logged(store, client):
    data = os.urandom(4 << 20)
    store.put("big.bin", data)
    received = 0
    started = time.monotonic()
    with client.stream("GET", store.slow_url("big.bin")) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            received += len(chunk)
            if time.monotonic() - started > 0.5:
                break  # cancel: close the connection mid-body
    assert 0 < received < len(data) / 2  # 256 KiB/s: about 128 KiB (plus socket buffers) in half a second
    [entry] = store.wait_requests(1, "slow/big.bin")
    assert entry["completion"] == "" and entry["body_bytes_sent"] < len(data)


@pytest.mark.parametrize("reset, error", [(False, httpx.RemoteProtocolError), (True, httpx.ReadError)])
def test_cut_download_resumes_with_range(store, client, reset, error):
    data = os.urandom(3 << 20)
    store.put("in/blob.bin", data)
    with CuttingProxy(("127.0.0.1", store.port), cut_after_bytes=100_000, reset=reset) as proxy:
        url = proxy.url(store.url("in/blob.bin"))
        got = bytearray()
        with pytest.raises(error):
            with client.stream("GET", url) as response:
                assert response.status_code == 200
                for chunk in response.iter_bytes():
                    got += chunk
        assert len(got) == 100_000 and bytes(got) == data[:100_000]

        rest = client.get(url, headers={"Range": f"bytes={len(got)}-"})
        assert rest.status_code == 206
        assert bytes(got) + rest.content == data

        first, second = proxy.requests
        assert first.range is None and second.range == "bytes=100000-"
        assert (first.method, first.target) == ("GET", "/in/blob.bin")
        assert [c.cut for c in proxy.connections] == [True, False] and proxy.cuts_done == 1

    assert [e["range"] for e in store.wait_requests(2, "in/blob.bin")] == ["", "bytes=100000-"]


def test_proxy_passes_keep_alive_uploads_and_records_every_head(store, client):
    with CuttingProxy(f"127.0.0.1:{store.port}", cut_times=0) as proxy:
        body = os.urandom(1 << 20)
        assert client.put(proxy.url("/up/x.bin"), content=body).status_code == 201
        assert client.get(proxy.url("/up/x.bin")).content == body
        assert [(r.connection, r.method, r.target) for r in proxy.requests] == [(0, "PUT", "/up/x.bin"),
                                                                               (0, "GET", "/up/x.bin")]
        assert proxy.requests[0].headers["content-length"] == str(len(body))
        # Re-armed, a zero budget passes the head and no body. The cut applies to a connection's first response:
        # the keep-alive connection above is not cut, a new client's connection is.
        proxy.arm(cut_after_bytes=0)
        assert client.get(proxy.url("/up/x.bin")).content == body
        with httpx.Client(timeout=30) as fresh:
            with pytest.raises(httpx.RemoteProtocolError, match="received 0 bytes"):
                fresh.get(proxy.url("/up/x.bin"))
            assert fresh.get(proxy.url("/up/x.bin")).content == body
        assert [c.cut for c in proxy.connections] == [False, True, False]
