"""A real object store for the tests: Debian's nginx with WebDAV PUT, and a proxy that cuts responses.

`NginxObjectStore` starts `/usr/sbin/nginx` (package `nginx`, built `--with-http_dav_module`) in the foreground
on 127.0.0.1 at a free port, serving a temporary root directory:

* ``GET /<path>``           static files, with ``Range`` (206, ``Content-Range``; 416 past the end) and
                            ``Accept-Ranges: bytes`` on 200 answers.
* ``PUT /<path>``           WebDAV PUT (``create_full_put_path on``): 201 for a new file, 204 for an existing one;
                            413 over ``max_body_size``. ``DELETE`` too (204).
* ``/status/<code>``        always answers ``<code>`` (see ``STATUS_CODES``; more via ``statuses=``).
* ``/slow/<path>``          the same files as ``/<path>`` (GET and PUT), sent at ``slow_rate`` bytes/s.
* ``/signed/<path>``        the same files, but 403 unless the query carries ``sig=<secret>``: a presigned URL.
* ``/redirect/<path>``      302 to ``/<path>`` (a relative ``Location``).

Every request lands in a JSON access log that ``requests()`` parses, so a test can assert "downloaded once" or
"uploaded once, with this query string". nginx writes the log line when it finalizes the request, which can be a
moment after the client has read the answer: use ``wait_requests()`` when counting right after a request.

`CuttingProxy` is a TCP proxy in front of any host:port that, for its first ``cut_times`` responses, passes the
response head and then only ``cut_after_bytes`` bytes of the body before dropping both connections; later
connections are proxied untouched. It records every request head, so a test can assert that a retry carried
``Range: bytes=N-``.

Neither class needs pytest; a fixture is a ``with`` block::

    @pytest.fixture
    def store(tmp_path):
        with NginxObjectStore(tmp_path / "store") as store:
            yield store
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import shutil
import socket
import struct
import subprocess
import tempfile
import termios
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["NginxObjectStore", "CuttingProxy", "ProxiedRequest", "find_nginx", "free_port", "STATUS_CODES"]

# The codes /status/<code> answers; `statuses=` adds more. 3xx needs a Location, so it is not among them.
STATUS_CODES = (200, 204, 400, 401, 403, 404, 408, 409, 410, 413, 416, 429, 500, 502, 503, 504)
SIGNED_SECRET = "test-signature"
INSTALL_HINT = "install Debian's nginx (apt-get install nginx; make test-deps does)"


def find_nginx() -> str:
    """The nginx binary (Debian puts it in /usr/sbin, which a non-root PATH may lack); a clear error if none."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"no nginx binary found: {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()  # SIGTERM: nginx's fast shutdown
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


_LOG_FORMAT = (
    '{"method":"$request_method","uri":"$uri","request_uri":"$request_uri","args":"$args",'
    '"status":$status,"bytes_sent":$bytes_sent,"body_bytes_sent":$body_bytes_sent,'
    '"request_length":$request_length,"content_length":"$content_length","range":"$http_range",'
    '"completion":"$request_completion","connection":$connection,"connection_requests":$connection_requests,'
    '"request_time":$request_time,"msec":$msec}'
)


class NginxObjectStore:
    """nginx serving (GET with Range) and accepting (WebDAV PUT) files under a temporary root; see the module doc.

    workdir:          where the config, logs, pid and nginx's body temp files go (a fresh temp dir if None,
                      removed by stop(); a given one is left in place). The served root is ``workdir/root``.
    max_body_size:    ``client_max_body_size`` in bytes (int) or nginx units ("1m"); 0 is unlimited.
                      A PUT with a larger Content-Length gets 413.
    slow_rate:        ``limit_rate`` of the /slow/ location, bytes per second.
    statuses:         extra codes for /status/<code>.
    extra_server_config: raw nginx directives appended inside the server block (more locations, say).
    start:            start in the constructor (True) or in ``__enter__``/``start()``.
    """

    def __init__(self, workdir: str | os.PathLike | None = None, *, max_body_size: int | str = 1 << 30,
                 slow_rate: int = 64 * 1024, statuses: tuple[int, ...] = (), extra_server_config: str = "",
                 start: bool = False, start_timeout: float = 10.0) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="nginx-store-") if workdir is None else workdir).resolve()
        self.root = self.workdir / "root"
        self.max_body_size = max_body_size
        self.slow_rate = slow_rate
        self.statuses = tuple(sorted(set(STATUS_CODES) | set(statuses)))
        self.extra_server_config = extra_server_config
        self.start_timeout = start_timeout
        self.signed_secret = SIGNED_SECRET
        self.conf_path = self.workdir / "nginx.conf"
        self.error_log = self.workdir / "error.log"
        self.access_log = self.workdir / "access.log"
        self.stderr_log = self.workdir / "nginx.stderr"
        self.pid_path = self.workdir / "nginx.pid"
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._log_mark = 0
        self._ready_token = f"ready-{os.urandom(8).hex()}"
        if start:
            self.start()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def __enter__(self) -> "NginxObjectStore":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("NginxObjectStore is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "NginxObjectStore":
        if self.running:
            return self
        nginx = find_nginx()
        for sub in ("root", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        begun = time.monotonic()
        last_error = ""
        for _attempt in range(5):  # a free port can be taken between free_port() and nginx's bind(): try another
            self.port = free_port()
            self.conf_path.write_text(self._config(nginx))
            for log in (self.error_log, self.stderr_log):
                log.write_bytes(b"")
            with open(self.stderr_log, "wb") as stderr:
                self._proc = subprocess.Popen(
                    [nginx, "-p", f"{self.workdir}/", "-c", str(self.conf_path), "-e", str(self.error_log),
                     "-g", "daemon off;"],
                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, close_fds=True)
            self._finalizer = weakref.finalize(self, _kill, self._proc)
            outcome = self._wait_ready(begun + self.start_timeout)
            if outcome == "ready":
                self.startup_seconds = time.monotonic() - begun
                return self
            last_error = self._logs()
            self._finalizer()
            self._proc = None
            if outcome != "in-use":
                break
        raise RuntimeError(f"nginx did not start on 127.0.0.1:{self.port} (config {self.conf_path}, kept); "
                           f"its error log:\n{last_error or '(empty)'}")

    def _wait_ready(self, deadline: float) -> str:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return "in-use" if "Address already in use" in self._logs() else "exited"
            if self._probe():
                return "ready"
            if "Address already in use" in self._logs():  # nginx retries bind() for 2.5 s: do not wait for it
                return "in-use"
            time.sleep(0.01)
        return "timeout"

    def _probe(self) -> bool:
        """Whether *this* nginx answers: a connect alone could reach whoever else holds the port."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(f"GET /{self._ready_token} HTTP/1.0\r\n\r\n".encode())
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
        except OSError:
            return False
        return answer.startswith(b"HTTP/1.1 200") and answer.endswith(self._ready_token.encode())

    def _logs(self) -> str:
        parts = []
        for log in (self.error_log, self.stderr_log):
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace").strip()
                if text:
                    parts.append(text)
        return "\n".join(parts)

    def error_log_text(self) -> str:
        return self._logs()

    def stop(self) -> None:
        """Stop nginx (SIGTERM, then SIGKILL); remove the workdir if this object made it. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._proc = None
        if self._own_workdir:
            _remove(self.workdir)

    def _config(self, nginx: str) -> str:
        built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
        temp_paths = "".join(
            f"    {module}_temp_path {self.workdir / module};\n"
            for module in ("proxy", "fastcgi", "uwsgi", "scgi")
            if f"--without-http_{module}_module" not in built)
        # master_process off: one process, which keeps the invoking user (root in CI), so uploads are written by
        # it: no worker dropping to www-data/nobody, no `user` directive needed. SIGTERM stops everything.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        status_locations = "".join(f"        location = /status/{code} {{ return {code}; }}\n"
                                   for code in self.statuses)
        root = self.root
        return f"""# generated by tests/object_store.py
{user}master_process off;
worker_processes 1;
pid {self.pid_path};
error_log {self.error_log} info;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    types {{ }}
    server_tokens off;
    sendfile on;
    keepalive_timeout 30s;
    log_format objstore escape=json '{_LOG_FORMAT}';
    access_log {self.access_log} objstore;
    client_body_temp_path {self.workdir / 'client_body'};
{temp_paths}    server {{
        listen 127.0.0.1:{self.port};
        server_name _;
        root {root};
        absolute_redirect off;
        client_max_body_size {self.max_body_size};
        dav_methods PUT DELETE;
        create_full_put_path on;
        dav_access user:rw group:r all:r;
        location / {{ }}
        location = /{self._ready_token} {{ access_log off; return 200 "{self._ready_token}"; }}
{status_locations}        location /slow/ {{
            alias {root}/;
            limit_rate {self.slow_rate};
        }}
        location /signed/ {{
            alias {root}/;
            if ($arg_sig != "{self.signed_secret}") {{ return 403; }}
        }}
        location /redirect/ {{
            rewrite ^/redirect/(.*)$ /$1 redirect;
        }}
{self.extra_server_config}
    }}
}}
"""

    # -- URLs and files ------------------------------------------------------------------------------------------

    def url(self, relpath: str = "", query: dict | str | None = None) -> str:
        """``http://127.0.0.1:<port>/<relpath>`` (percent-quoted) with an optional query (dict or raw string)."""
        url = f"{self.base_url}/{urllib.parse.quote(relpath.lstrip('/'), safe='/')}"
        if query:
            url += "?" + (query if isinstance(query, str) else urllib.parse.urlencode(query))
        return url

    def slow_url(self, relpath: str, query: dict | str | None = None) -> str:
        return self.url("slow/" + relpath.lstrip("/"), query)

    def signed_url(self, relpath: str, sig: str | None = None, **query: str) -> str:
        """A "presigned" URL: /signed/<relpath>?sig=...; a wrong ``sig`` gets 403."""
        return self.url("signed/" + relpath.lstrip("/"), {**query, "sig": self.signed_secret if sig is None else sig})

    def status_url(self, code: int) -> str:
        if code not in self.statuses:
            raise ValueError(f"/status/{code} is not configured; pass statuses=({code},)")
        return self.url(f"status/{code}")

    def redirect_url(self, relpath: str) -> str:
        return self.url("redirect/" + relpath.lstrip("/"))

    def path(self, relpath: str) -> Path:
        """The file behind ``/<relpath>`` (not checked to exist)."""
        path = (self.root / relpath.lstrip("/")).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"{relpath!r} is outside the store's root")
        return path

    def put(self, relpath: str, data: bytes) -> Path:
        """Write a file straight into the root (no HTTP, not logged)."""
        path = self.path(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def read(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).exists()

    # -- the access log ------------------------------------------------------------------------------------------

    def requests(self, path: str | None = None, method: str | None = None, *, since_mark: bool = True) -> list[dict]:
        """The access log's entries (oldest first), filtered by path (relative or absolute, as in url(); a /slow/
        or /signed/ request's path starts with that prefix) and method. Each entry: method, uri (decoded path),
        request_uri (as sent), args (query string), status, bytes_sent, body_bytes_sent, request_length,
        content_length, range (the Range header, "" if none), completion ("OK" if the whole answer was sent),
        connection, connection_requests, request_time, msec. Entries before mark() are left out by default."""
        try:
            raw = self.access_log.read_bytes()
        except FileNotFoundError:
            return []
        if since_mark:
            raw = raw[self._log_mark:]
        want = None if path is None else "/" + path.lstrip("/")
        entries = []
        for line in raw.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if want is not None and entry["uri"] != want:
                continue
            if method is not None and entry["method"] != method.upper():
                continue
            entries.append(entry)
        return entries

    def wait_requests(self, count: int, path: str | None = None, method: str | None = None,
                      timeout: float = 5.0) -> list[dict]:
        """requests(path, method) once at least ``count`` are logged (or, after ``timeout``, whatever is)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.requests(path, method)
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.01)

    def mark(self) -> None:
        """Forget the requests logged so far (requests() starts after this point)."""
        with contextlib.suppress(FileNotFoundError):
            self._log_mark = self.access_log.stat().st_size


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ProxiedRequest:
    """One request head that went through a CuttingProxy."""
    connection: int  # the proxy's connection number, from 0
    method: str
    target: str  # as sent: path and query
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    raw: bytes  # the head, request line to the blank line

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class _Connection:
    number: int
    client: socket.socket
    upstream: socket.socket | None = None
    cut: bool = False
    response_heads: list[bytes] = field(default_factory=list)
    bytes_to_client: int = 0
    # request parsing
    req_state: str = "head"  # head | body | opaque (chunked: not followed further)
    req_buf: bytes = b""
    req_body_left: int = 0
    # response parsing
    resp_state: str = "head"  # head | budget | pass
    resp_buf: bytes = b""
    budget: int = 0


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _outq(sock: socket.socket) -> int:
    """Bytes not yet acknowledged by the peer (Linux SIOCOUTQ); 0 where unknown."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0)))[0]
    except (OSError, AttributeError):
        return 0


class CuttingProxy:
    """A threaded TCP proxy on 127.0.0.1:<free port> in front of ``upstream`` that cuts the first responses.

    For each of the first ``cut_times`` responses (counted when a connection's first response head arrives), the
    proxy forwards the whole response head and then exactly ``cut_after_bytes`` further bytes (the body: a
    1xx interim head is passed through and not counted), then drops the client and the upstream connection:
    ``reset=False`` closes with FIN after those bytes are delivered (the client sees a short body: httpx raises
    RemoteProtocolError), ``reset=True`` with RST (httpx: ReadError). A response shorter than ``cut_after_bytes``
    on a keep-alive connection lets the next response on that connection use up the rest of the budget.
    Connections after those are proxied untouched. The cut is decided per connection, on its first response: a
    keep-alive connection passed untouched stays so after ``arm()``; a new connection is cut. Every request head
    is recorded (``requests``), as is the first response head of each connection (``connections``: number, cut,
    response_heads, bytes_to_client counting head and body bytes passed). ``arm()`` re-arms the cut.

    upstream: (host, port), or "host:port", or an "http://host:port/..." URL.
    """

    def __init__(self, upstream: tuple[str, int] | str, *, cut_after_bytes: int = 0, cut_times: int = 1,
                 reset: bool = False, io_timeout: float = 30.0) -> None:
        if isinstance(upstream, str):
            parsed = urllib.parse.urlsplit(upstream if "//" in upstream else f"//{upstream}")
            upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.upstream = upstream
        self.cut_after_bytes = cut_after_bytes
        self.cut_times = cut_times
        self.reset = reset
        self.io_timeout = io_timeout
        self.cuts_done = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: list[_Connection] = []
        self._requests: list[ProxiedRequest] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"cutting-proxy-{self.port}", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> "CuttingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path_or_url: str = "/") -> str:
        """The proxy's URL for a path ("/a/b?x=1"), or an upstream URL with its host:port swapped for the proxy's."""
        if "://" in path_or_url:
            parts = urllib.parse.urlsplit(path_or_url)
            return urllib.parse.urlunsplit(("http", f"127.0.0.1:{self.port}", parts.path, parts.query, ""))
        return self.base_url + "/" + path_or_url.lstrip("/")

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def connections(self) -> list[_Connection]:
        with self._lock:
            return list(self._connections)

    def arm(self, cut_after_bytes: int | None = None, cut_times: int = 1, reset: bool | None = None) -> None:
        """Cut the next ``cut_times`` responses (again)."""
        with self._lock:
            if cut_after_bytes is not None:
                self.cut_after_bytes = cut_after_bytes
            if reset is not None:
                self.reset = reset
            self.cut_times = cut_times
            self.cuts_done = 0

    def stop(self) -> None:
        """Stop accepting, drop every open connection, join the threads (bounded). Idempotent."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in self.connections:
            for sock in (conn.client, conn.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        for thread in [self._acceptor, *self._threads]:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    # -- internals -----------------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed by stop()
            with self._lock:
                conn = _Connection(number=len(self._connections), client=client)
                self._connections.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                          name=f"cutting-proxy-{self.port}-{conn.number}")
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: _Connection) -> None:
        client = conn.client
        try:
            conn.upstream = upstream = socket.create_connection(self.upstream, timeout=self.io_timeout)
        except OSError:
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        client.settimeout(self.io_timeout)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, "client")
        selector.register(upstream, selectors.EVENT_READ, "upstream")
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(0.1):
                    if key.data == "client":
                        data = client.recv(65536)
                        if not data:  # the client is done sending: tell the upstream, keep answering
                            selector.unregister(client)
                            with contextlib.suppress(OSError):
                                upstream.shutdown(socket.SHUT_WR)
                            continue
                        self._record_requests(conn, data)
                        upstream.sendall(data)
                    else:
                        data = upstream.recv(65536)
                        if not data:
                            return  # the upstream closed: so does the client (finally)
                        out, cut = self._filter_response(conn, data)
                        if out:
                            client.sendall(out)
                            conn.bytes_to_client += len(out)
                        if cut:
                            self._cut(conn)
                            return
        except OSError:
            pass  # either side went away, or stop() shut the sockets
        finally:
            selector.close()
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    def _cut(self, conn: _Connection) -> None:
        client = conn.client
        if not self.reset:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)  # FIN after the bytes passed
        deadline = time.monotonic() + 10  # let the bytes passed reach the client before the drop
        while _outq(client) and time.monotonic() < deadline and not self._stopping.is_set():
            time.sleep(0.005)
        if self.reset:
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            conn.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # the finally of _serve closes both

    def _record_requests(self, conn: _Connection, data: bytes) -> None:
        while data and conn.req_state != "opaque":
            if conn.req_state == "body":
                taken = min(conn.req_body_left, len(data))
                conn.req_body_left -= taken
                data = data[taken:]
                if conn.req_body_left == 0:
                    conn.req_state = "head"
                continue
            conn.req_buf += data
            data = b""
            end = conn.req_buf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.req_buf) > 1 << 20:
                    conn.req_state, conn.req_buf = "opaque", b""
                return
            head, data = conn.req_buf[:end + 4], conn.req_buf[end + 4:]
            conn.req_buf = b""
            line, headers = _parse_head(head)
            method, _, rest = line.partition(" ")
            target = rest.rsplit(" ", 1)[0] if " " in rest else rest
            with self._lock:
                self._requests.append(ProxiedRequest(conn.number, method, target, headers, head))
            if "chunked" in headers.get("transfer-encoding", "").lower():
                conn.req_state = "opaque"
            else:
                try:
                    conn.req_body_left = int(headers.get("content-length", "0"))
                except ValueError:
                    conn.req_state = "opaque"
                    return
                if conn.req_body_left:
                    conn.req_state = "body"

    def _filter_response(self, conn: _Connection, data: bytes) -> tuple[bytes, bool]:
        """What of ``data`` goes to the client, and whether to cut the connection after it."""
        out = b""
        while data:
            if conn.resp_state == "pass":
                return out + data, False
            if conn.resp_state == "budget":
                taken = data[:conn.budget]
                conn.budget -= len(taken)
                return out + taken, conn.budget == 0
            conn.resp_buf += data
            data = b""
            end = conn.resp_buf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.resp_buf) > 1 << 20:  # not HTTP: stop looking
                    conn.resp_state, data, conn.resp_buf = "pass", conn.resp_buf, b""
                continue
            head, data = conn.resp_buf[:end + 4], conn.resp_buf[end + 4:]
            conn.resp_buf = b""
            out += head
            status_line = head.split(b"\r\n", 1)[0].split()
            if len(status_line) > 1 and status_line[1].startswith(b"1"):
                continue  # 100 Continue and friends: the real head follows
            with self._lock:
                conn.response_heads.append(head)
                cut = self.cuts_done < self.cut_times
                if cut:
                    self.cuts_done += 1
                    conn.cut = True
                    conn.budget = self.cut_after_bytes
            if not cut:
                conn.resp_state = "pass"
                continue
            conn.resp_state = "budget"
            if conn.budget == 0:
                return out, True
        return out, False
