"""The dev control plane's artifacts extension, over real HTTP: planning uploads, the object store behind the
signed URLs, and the test hooks (size limits, faults) an agent's uploads are tried against."""

import hashlib
import http.client
import socket
import time
import tracemalloc
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from devplane import DevControlPlane

AGENT = {"X-Radix-Cluster-Token": "dev-cluster-token", "X-Radix-Tenant-Id": "t"}


@pytest.fixture
def plane():
    plane = DevControlPlane().start()
    yield plane
    plane.stop()


@pytest.fixture
def client(plane):
    with httpx.Client(base_url=plane.url, timeout=30) as client:
        yield client


def assign(client: httpx.Client, job_id: str) -> None:
    """Submit a job and take it with a poll, as an agent would: only an assigned job takes artifacts."""
    assert client.post("/admin/jobs", json={"job_id": job_id, "image": "busybox"}).status_code == 201
    answer = client.post("/v1/clusters/dev-cluster/jobs/poll", headers=AGENT, json={"max_jobs": 1, "wait_seconds": 0})
    assert [job["job_id"] for job in answer.json()["jobs"]] == [job_id]


def declared(path: str, data: bytes, content_type: str = "application/octet-stream") -> dict:
    return {"path": path, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "content_type": content_type}


def plan(client: httpx.Client, job_id: str, files: list[dict], **kwargs) -> httpx.Response:
    return client.post(f"/v1/clusters/dev-cluster/jobs/{job_id}/artifacts", json={"files": files},
                       headers=kwargs.pop("headers", AGENT), **kwargs)


def plan_one(client: httpx.Client, job_id: str, path: str, data: bytes, content_type: str = "text/plain") -> dict:
    answer = plan(client, job_id, [declared(path, data, content_type)])
    assert answer.status_code == 200, answer.text
    return answer.json()["uploads"][0]


def put(client: httpx.Client, upload: dict, data, **headers) -> httpx.Response:
    return client.put(upload["url"], content=data, headers={**upload["headers"], **headers})


def stats(client: httpx.Client) -> dict:
    return client.get("/admin/stats").json()


def stored_files(plane: DevControlPlane) -> list:
    return sorted(entry.name for entry in plane.state.objects.dir.iterdir())


def raw(plane: DevControlPlane, method: str, target: str, body: bytes = b"", headers: dict | None = None):
    """A request whose target goes out exactly as written (httpx would resolve the '..' segments itself)."""
    host, port = plane.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --- planning ------------------------------------------------------------------------------------------------


def test_a_plan_gives_one_signed_put_per_file_in_order(plane, client):
    assign(client, "job-1")
    files = [declared("out/b.png", b"png!", "image/png"), declared("a b/ü%.txt", b"text", "text/plain"),
             {"path": "raw.bin", "size_bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}]
    before = int(time.time())
    answer = plan(client, "job-1", files, headers={**AGENT, "Host": "plane.example:8443"})
    assert answer.status_code == 200, answer.text
    uploads = answer.json()["uploads"]
    assert [u["path"] for u in uploads] == ["out/b.png", "a b/ü%.txt", "raw.bin"]
    assert [u["method"] for u in uploads] == ["PUT"] * 3
    assert [u["headers"] for u in uploads] == [{"Content-Type": "image/png"}, {"Content-Type": "text/plain"},
                                               {"Content-Type": "application/octet-stream"}]
    url = urlsplit(uploads[1]["url"])
    assert (url.scheme, url.netloc) == ("http", "plane.example:8443")  # where the request came in
    assert url.path == "/objects/job-1/a%20b/%C3%BC%25.txt"
    query = parse_qs(url.query)
    expires = int(query["expires"][0])
    assert before + 3600 <= expires <= int(time.time()) + 3600
    assert query["signature"][0] == plane.state.signer.put("job-1", "a b/ü%.txt", expires, 4,
                                                           hashlib.sha256(b"text").hexdigest())
    record = client.get("/admin/jobs/job-1/artifacts").json()["artifacts"]
    assert [(a["path"], a["stored"]) for a in record] == [("out/b.png", False), ("a b/ü%.txt", False),
                                                          ("raw.bin", False)]
    assert stats(client)["artifacts"] == 1


def test_the_url_lifetime_is_a_setting(client):
    assign(client, "job-1")
    assert client.post("/admin/config", json={"url_ttl_seconds": 60}).status_code == 200
    upload = plan_one(client, "job-1", "a.txt", b"a")
    assert int(parse_qs(urlsplit(upload["url"]).query)["expires"][0]) <= time.time() + 60


GOOD_SHA = "0" * 64


@pytest.mark.parametrize("body, field", [
    ({}, "files"),
    ({"files": {"path": "a"}}, "files"),
    ({"files": ["a.txt"]}, "files[0]"),
    ({"files": [{"size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path"),
    ({"files": [{"path": "", "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path"),
    ({"files": [{"path": "/etc/passwd", "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path: is absolute"),
    ({"files": [{"path": "a/../../b", "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path: has a '..'"),
    ({"files": [{"path": "..", "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path: has a '..'"),
    ({"files": [{"path": "a//b", "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path"),
    ({"files": [{"path": "./a", "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path"),
    ({"files": [{"path": "a\0b", "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path: contains a NUL"),
    ({"files": [{"path": "x" * 1025, "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path: is 1025 bytes"),
    ({"files": [{"path": "é" * 513, "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path: is 1026 bytes"),
    ({"files": [{"path": 7, "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[0].path"),
    ({"files": [{"path": "a", "sha256": GOOD_SHA}]}, "files[0].size_bytes"),
    ({"files": [{"path": "a", "size_bytes": -1, "sha256": GOOD_SHA}]}, "files[0].size_bytes"),
    ({"files": [{"path": "a", "size_bytes": 1.5, "sha256": GOOD_SHA}]}, "files[0].size_bytes"),
    ({"files": [{"path": "a", "size_bytes": "1", "sha256": GOOD_SHA}]}, "files[0].size_bytes"),
    ({"files": [{"path": "a", "size_bytes": True, "sha256": GOOD_SHA}]}, "files[0].size_bytes"),
    ({"files": [{"path": "a", "size_bytes": 1}]}, "files[0].sha256"),
    ({"files": [{"path": "a", "size_bytes": 1, "sha256": "A" * 64}]}, "files[0].sha256"),
    ({"files": [{"path": "a", "size_bytes": 1, "sha256": "0" * 63}]}, "files[0].sha256"),
    ({"files": [{"path": "a", "size_bytes": 1, "sha256": GOOD_SHA, "content_type": "a\nb"}]}, "files[0].content_type"),
    ({"files": [{"path": "a", "size_bytes": 1, "sha256": GOOD_SHA},
                {"path": "a", "size_bytes": 1, "sha256": GOOD_SHA}]}, "files[1].path: 'a' is already files[0]"),
])
def test_a_malformed_plan_is_a_400_naming_the_field(plane, client, body, field):
    assign(client, "job-1")
    answer = client.post("/v1/clusters/dev-cluster/jobs/job-1/artifacts", json=body, headers=AGENT)
    assert answer.status_code == 400
    assert field in answer.json()["error"], answer.json()
    assert plane.state.jobs["job-1"].artifacts == {} and plane.state.signed_uploads == {}


def test_a_body_that_is_not_json_is_a_400(client):
    assign(client, "job-1")
    answer = client.post("/v1/clusters/dev-cluster/jobs/job-1/artifacts", content=b"{nope", headers=AGENT)
    assert answer.status_code == 400


def test_unknown_job_404_and_unassigned_job_409(plane, client):
    files = [declared("a.txt", b"a")]
    assert plan(client, "nobody", files).status_code == 404
    assign(client, "done-1")
    assert client.post("/v1/clusters/dev-cluster/jobs/done-1/complete", headers=AGENT,
                       json={"status": "succeeded"}).status_code == 200
    done = plan(client, "done-1", files)
    assert done.status_code == 409 and "done" in done.json()["error"]
    assert client.post("/admin/jobs", json={"job_id": "queued-1", "image": "busybox"}).status_code == 201
    queued = plan(client, "queued-1", files)
    assert queued.status_code == 409 and "queued" in queued.json()["error"]


def test_planning_is_authenticated_like_every_agent_call(plane, client):
    assign(client, "job-1")
    files = [declared("a.txt", b"a")]
    assert plan(client, "job-1", files, headers={"X-Radix-Tenant-Id": "t"}).status_code == 401
    assert plan(client, "job-1", files, headers={**AGENT, "X-Radix-Cluster-Token": "wrong"}).status_code == 401
    assert plan(client, "job-1", files, headers={"X-Radix-Cluster-Token": "dev-cluster-token"}).status_code == 400
    assert client.post("/v1/clusters/other/jobs/job-1/artifacts", json={"files": files},
                       headers=AGENT).status_code == 404
    assert plane.state.signed_uploads == {}


def test_a_core_only_server_does_not_know_the_endpoint(client):
    assign(client, "job-1")
    assert client.post("/admin/config", json={"extensions": False}).status_code == 200
    assert plan(client, "job-1", [declared("a.txt", b"a")]).status_code == 404


def test_planning_answers_injected_faults(client):
    assign(client, "job-1")
    client.post("/admin/faults", json={"endpoint": "artifacts", "responses": [503, 500]})
    assert plan(client, "job-1", [declared("a.txt", b"a")]).status_code == 503
    assert plan(client, "job-1", [declared("a.txt", b"a")]).status_code == 500
    assert plan(client, "job-1", [declared("a.txt", b"a")]).status_code == 200
    assert stats(client)["faults_artifacts"] == 2


# --- PUT -----------------------------------------------------------------------------------------------------


def test_a_put_stores_the_bytes_and_is_counted(plane, client):
    assign(client, "job-1")
    data = b"hello artifact\n"
    upload = plan_one(client, "job-1", "out/hello.txt", data)
    answer = put(client, upload, data)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"ok": True, "path": "out/hello.txt", "size_bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}
    assert plane.artifact_file("job-1", "out/hello.txt").read_bytes() == data
    counters = stats(client)
    assert counters["artifact_puts"] == {"job-1/out/hello.txt": 1}
    assert counters["artifact_put_attempts"] == {"job-1/out/hello.txt": 1}
    [entry] = client.get("/admin/jobs/job-1").json()["artifacts"]
    assert entry["stored"] and entry["puts"] == 1 and entry["size_bytes"] == len(data)
    assert entry["content_type"] == "text/plain" and entry["sha256"] == hashlib.sha256(data).hexdigest()
    # An empty file is an object too.
    empty = plan_one(client, "job-1", "empty", b"")
    assert put(client, empty, b"").status_code == 200
    assert plane.artifact_file("job-1", "empty").read_bytes() == b""


def test_a_put_after_the_job_completed_is_still_taken(plane, client):
    """The URL was valid when signed: an upload that finishes after the completion is stored, not lost."""
    assign(client, "job-1")
    upload = plan_one(client, "job-1", "late.txt", b"late")
    client.post("/v1/clusters/dev-cluster/jobs/job-1/complete", headers=AGENT, json={"status": "succeeded"})
    assert put(client, upload, b"late").status_code == 200
    assert plane.artifact_file("job-1", "late.txt").read_bytes() == b"late"


def test_a_url_only_works_for_what_it_was_signed_for(plane, client):
    assign(client, "job-1")
    upload = plan_one(client, "job-1", "a.txt", b"aaaa")
    other = plan_one(client, "job-1", "b.txt", b"bbbb")
    url = urlsplit(upload["url"])
    query = parse_qs(url.query)
    forged = [
        f"{url.path}?expires={query['expires'][0]}&signature={'0' * 64}",  # a made-up signature
        f"{url.path}?expires={int(query['expires'][0]) + 1}&signature={query['signature'][0]}",  # a later expiry
        f"/objects/job-1/b.txt?{url.query}",  # another path
        f"/objects/job-2/a.txt?{url.query}",  # another job
        f"{urlsplit(other['url']).path}?expires={query['expires'][0]}&signature={query['signature'][0]}",
    ]
    for target in forged:
        answer = client.put(target, content=b"aaaa", headers={"Content-Type": "text/plain"})
        assert answer.status_code == 403 and "signature" in answer.json()["error"], (target, answer.text)
    missing = client.put(url.path, content=b"aaaa", headers={"Content-Type": "text/plain"})
    assert missing.status_code == 400 and "expires" in missing.json()["error"]
    assert stored_files(plane) == []
    assert stats(client)["artifact_puts"] == {}


def test_an_expired_url_is_a_403(plane, client):
    assign(client, "job-1")
    client.post("/admin/config", json={"url_ttl_seconds": 0})  # URLs that are already expired
    upload = plan_one(client, "job-1", "a.txt", b"a")
    answer = put(client, upload, b"a")
    assert answer.status_code == 403 and "expired" in answer.json()["error"]
    assert plane.artifact_file("job-1", "a.txt") is None


def test_the_signed_content_type_must_be_sent(client):
    assign(client, "job-1")
    upload = plan_one(client, "job-1", "a.txt", b"a", content_type="text/plain")
    answer = client.put(upload["url"], content=b"a", headers={"Content-Type": "application/json"})
    assert answer.status_code == 403 and "Content-Type" in answer.json()["error"]
    answer = client.put(upload["url"], content=b"a")  # none at all
    assert answer.status_code == 403


def test_size_and_sha256_mismatches_are_400_and_keep_nothing(plane, client):
    assign(client, "job-1")
    data = b"0123456789"
    upload = plan_one(client, "job-1", "a.txt", data)
    shorter = put(client, upload, data[:-1])
    assert shorter.status_code == 400 and "size mismatch" in shorter.json()["error"]
    longer = put(client, upload, data + b"!")
    assert longer.status_code == 400 and "size mismatch" in longer.json()["error"]
    other = put(client, upload, b"9876543210")
    assert other.status_code == 400 and "sha256 mismatch" in other.json()["error"]
    assert stored_files(plane) == []  # not even the temporary file of the one that was read
    assert plane.artifact_file("job-1", "a.txt") is None
    counters = stats(client)
    assert counters["artifact_puts"] == {} and counters["artifact_put_attempts"] == {"job-1/a.txt": 3}
    assert put(client, upload, data).status_code == 200  # the URL still works for the right bytes


def test_a_body_cut_short_keeps_nothing(plane, client):
    assign(client, "job-1")
    upload = plan_one(client, "job-1", "a.txt", b"x" * 1000)
    url = urlsplit(upload["url"])
    host, port = plane.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                     "Content-Length: 1000\r\n\r\n".encode() + b"x" * 400)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert b"HTTP/1.1 400" in answer and b"body cut short" in answer, answer[:300]
    assert stored_files(plane) == []


def test_a_put_without_content_length_is_a_411(client):
    assign(client, "job-1")
    upload = plan_one(client, "job-1", "a.txt", b"a")
    answer = client.put(upload["url"], content=iter([b"a"]), headers=upload["headers"])  # chunked
    assert answer.status_code == 411


def test_an_object_over_max_object_bytes_is_a_413_without_reading_it(plane, client):
    assign(client, "job-1")
    assert client.post("/admin/config", json={"max_object_bytes": 1000}).status_code == 200
    small = plan_one(client, "job-1", "small", b"s" * 1000)
    assert put(client, small, b"s" * 1000).status_code == 200  # the limit itself is fine
    size = 64 << 20
    digest = hashlib.sha256()
    for _ in range(64):
        digest.update(b"\0" * (1 << 20))
    answer = plan(client, "job-1", [{"path": "big", "size_bytes": size, "sha256": digest.hexdigest()}])
    upload = answer.json()["uploads"][0]
    big = put(client, upload, (b"\0" * (1 << 20) for _ in range(64)), **{"Content-Length": str(size)})
    assert big.status_code == 413 and "limit of 1000" in big.json()["error"]
    assert plane.artifact_file("job-1", "big") is None
    # A client that asks first (Expect: 100-continue, as curl does) is told before it sends a byte.
    url = urlsplit(upload["url"])
    host, port = plane.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {size}\r\nExpect: 100-continue\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer, answer[:300]
    assert client.post("/admin/config", json={"max_object_bytes": None}).status_code == 200
    assert stats(client)["artifact_put_attempts"]["job-1/big"] == 2


@pytest.mark.parametrize("target", [
    "/objects/job-1/../../../../tmp/escaped",
    "/objects/job-1/%2e%2e/%2e%2e/%2E%2E/tmp/escaped",
    "/objects/job-1/a/..%2f..%2f..%2ftmp%2fescaped",
    "/objects/job-1//tmp/escaped",
    "/objects/job-1/%2Ftmp%2Fescaped",
    "/objects/job-1/a%00b",
])
def test_no_path_reaches_outside_the_store(plane, client, target, tmp_path):
    assign(client, "job-1")
    plan_one(client, "job-1", "a.txt", b"a")
    signed = f"{target}?expires={int(time.time()) + 60}&signature={'0' * 64}"
    status, body = raw(plane, "PUT", signed, b"a", {"Content-Type": "text/plain"})
    assert status == 400, body
    status, body = raw(plane, "GET", signed)
    assert status == 400, body
    assert stored_files(plane) == []
    assert not (plane.state.objects.dir.parent / "tmp" / "escaped").exists()


def test_a_store_key_never_follows_the_path_on_disk(plane, client):
    """Even a path that is fine ('a/b') is not a directory in the store: objects are named by a hash."""
    assign(client, "job-1")
    upload = plan_one(client, "job-1", "deep/er/a.txt", b"a")
    assert put(client, upload, b"a").status_code == 200
    [name] = stored_files(plane)
    assert len(name) == 64 and (plane.state.objects.dir / name).is_file()


def test_a_large_body_is_streamed_to_disk(plane, client):
    """50 MB through the store while allocations are traced: the server never holds the body (the client
    streams it from a generator, 1 MiB at a time, so the peak is the server's pieces, not the object)."""
    assign(client, "job-1")
    piece = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(50):
        digest.update(piece)
    size = 50 * len(piece)
    answer = plan(client, "job-1", [{"path": "big.bin", "size_bytes": size, "sha256": digest.hexdigest()}])
    upload = answer.json()["uploads"][0]
    tracemalloc.start()
    try:
        stored = put(client, upload, (piece for _ in range(50)), **{"Content-Length": str(size)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stored.status_code == 200, stored.text
    assert peak < 16 << 20, f"{peak} bytes allocated at the peak for a {size}-byte upload"
    assert plane.artifact_file("job-1", "big.bin").stat().st_size == size
    read = hashlib.sha256()
    with client.stream("GET", "/admin/jobs/job-1/artifacts/big.bin") as download:
        assert download.status_code == 200 and download.headers["Content-Length"] == str(size)
        for chunk in download.iter_bytes():
            read.update(chunk)
    assert read.hexdigest() == digest.hexdigest()


def test_each_upload_is_counted_by_job_and_path(client):
    """What an agent test asserts: every file uploaded exactly once, and how many tries it took."""
    assign(client, "job-1")
    client.post("/admin/faults", json={"endpoint": "objects", "responses": [503, 0]})
    upload = plan_one(client, "job-1", "a.txt", b"a")
    assert put(client, upload, b"a").status_code == 503
    with pytest.raises(httpx.TransportError):
        put(client, upload, b"a")
    assert put(client, upload, b"a").status_code == 200
    assert put(client, upload, b"a").status_code == 200  # the same URL again: a second upload, counted
    counters = stats(client)
    assert counters["artifact_puts"] == {"job-1/a.txt": 2}
    assert counters["artifact_put_attempts"] == {"job-1/a.txt": 4}
    assert counters["faults_objects"] == 2


def test_a_fault_answer_stores_nothing(plane, client):
    assign(client, "job-1")
    client.post("/admin/faults", json={"endpoint": "objects", "responses": [413, 1]})
    upload = plan_one(client, "job-1", "a.txt", b"a")
    assert put(client, upload, b"a").status_code == 413
    lying = put(client, upload, b"a")
    assert lying.status_code == 200 and lying.content == b"<html>proxy error</html>"
    assert stored_files(plane) == [] and stats(client)["artifact_puts"] == {}


def test_planning_again_keeps_a_stored_object_only_if_it_is_the_same(client):
    assign(client, "job-1")
    put(client, plan_one(client, "job-1", "a.txt", b"one"), b"one")
    plan_one(client, "job-1", "a.txt", b"one")
    [entry] = client.get("/admin/jobs/job-1/artifacts").json()["artifacts"]
    assert entry["stored"]
    upload = plan_one(client, "job-1", "a.txt", b"two!")
    [entry] = client.get("/admin/jobs/job-1/artifacts").json()["artifacts"]
    assert not entry["stored"] and entry["size_bytes"] == 4
    put(client, upload, b"two!")
    [entry] = client.get("/admin/jobs/job-1/artifacts").json()["artifacts"]
    assert entry["stored"] and entry["puts"] == 2
    assert client.get("/admin/jobs/job-1/artifacts/a.txt").content == b"two!"


# --- reading -------------------------------------------------------------------------------------------------


def test_artifacts_are_read_back_under_a_signed_get_url_and_through_the_admin_api(plane, client):
    assign(client, "job-1")
    data = b"\x89PNG not really"
    put(client, plan_one(client, "job-1", "out/ü a.png", data, "image/png"), data)
    got = httpx.get(plane.artifact_url("job-1", "out/ü a.png"))
    assert got.status_code == 200 and got.content == data and got.headers["Content-Type"] == "image/png"
    assert got.headers["X-Radix-Sha256"] == hashlib.sha256(data).hexdigest()
    assert httpx.get(plane.artifact_url("job-1", "out/ü a.png", ttl_seconds=0)).status_code == 403
    url = urlsplit(plane.artifact_url("job-1", "out/ü a.png"))
    assert client.get(f"/objects/job-1/other.png?{url.query}").status_code == 403
    put_url = plan_one(client, "job-1", "x", b"x")["url"]
    assert httpx.get(put_url).status_code == 403  # a PUT signature does not read
    assert httpx.get(plane.artifact_url("job-1", "never.png")).status_code == 404
    admin = client.get("/admin/jobs/job-1/artifacts/out/%C3%BC%20a.png")
    assert admin.status_code == 200 and admin.content == data
    missing = client.get("/admin/jobs/job-1/artifacts/nope.txt")
    assert missing.status_code == 404 and "nope.txt" in missing.json()["error"]
    assert client.get("/admin/jobs/nobody/artifacts").status_code == 404
    assert client.get("/admin/jobs/nobody/artifacts/a.txt").status_code == 404
    listing = client.get("/admin/jobs/job-1/artifacts").json()
    assert listing["job_id"] == "job-1"
    assert {(a["path"], a["stored"]) for a in listing["artifacts"]} == {("out/ü a.png", True), ("x", False)}


def test_objects_outlive_an_outage_and_go_with_the_server(client):
    plane = DevControlPlane().start()
    try:
        with httpx.Client(base_url=plane.url, timeout=30) as own:
            assign(own, "job-1")
            put(own, plan_one(own, "job-1", "a.txt", b"a"), b"a")
            plane.pause()
            plane.resume()
            assert own.get("/admin/jobs/job-1/artifacts/a.txt").content == b"a"
    finally:
        plane.stop()
    assert not plane.state.objects.dir.exists()


def test_reset_forgets_objects_and_counters(plane, client):
    assign(client, "job-1")
    upload = plan_one(client, "job-1", "a.txt", b"a")
    put(client, upload, b"a")
    assert client.post("/admin/reset").status_code == 200
    assert stored_files(plane) == [] and stats(client)["artifact_puts"] == {}
    assert put(client, upload, b"a").status_code == 403  # its signature is forgotten too


# --- a control plane that refuses large results --------------------------------------------------------------


def test_a_complete_over_max_complete_bytes_is_a_413_and_never_taken(plane, client):
    assign(client, "job-1")
    assert client.post("/admin/config", json={"max_complete_bytes": 1000}).status_code == 200
    big = {"status": "succeeded", "output_payload": {"blob": "x" * 5000}}
    answer = client.post("/v1/clusters/dev-cluster/jobs/job-1/complete", headers=AGENT, json=big)
    assert answer.status_code == 413 and "limit of 1000" in answer.json()["error"]
    record = client.get("/admin/jobs/job-1").json()
    assert record["state"] == "assigned" and record["result"] is None and record["deliveries"] == 0
    counters = stats(client)
    assert counters["completes"] == 0 and counters["completes_refused"] == 1
    # A large body well past the socket buffers still gets its answer (drained, not reset).
    huge = {"status": "succeeded", "output_payload": {"blob": "x" * (8 << 20)}}
    assert client.post("/v1/clusters/dev-cluster/jobs/job-1/complete", headers=AGENT, json=huge).status_code == 413
    small = {"status": "succeeded", "artifacts": [{"path": "a.txt"}]}
    assert client.post("/v1/clusters/dev-cluster/jobs/job-1/complete", headers=AGENT, json=small).status_code == 200
    assert client.get("/admin/jobs/job-1").json()["result"] == small
    # Other calls are not limited.
    assert client.post("/v1/clusters/dev-cluster/jobs/poll", headers=AGENT,
                       json={"max_jobs": 0, "wait_seconds": 0, "pad": "x" * 5000}).status_code == 200


@pytest.mark.parametrize("setting", [{"max_complete_bytes": -1}, {"max_object_bytes": "big"},
                                     {"url_ttl_seconds": None}, {"url_ttl_seconds": True}])
def test_a_bad_setting_is_a_400(client, setting):
    answer = client.post("/admin/config", json=setting)
    assert answer.status_code == 400 and next(iter(setting)) in answer.json()["error"]
