#!/usr/bin/env bash
# Makes sure a Docker engine answers on /var/run/docker.sock: installs Debian's docker.io when no dockerd is
# present (root only), then starts dockerd in the background when nothing answers. Idempotent; used by .ci/run,
# `make demo` and `make test` on machines where no service manager starts the engine.
set -euo pipefail
sock=${DOCKER_SOCK:-/var/run/docker.sock}

answers() { python3 - "$sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
try:
    s.connect(sys.argv[1]); s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n"); sys.exit(0 if b"OK" in s.recv(4096) else 1)
except OSError:
    sys.exit(1)
PY
}

if answers; then echo "docker engine: answering on $sock"; exit 0; fi
if ! command -v dockerd >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "no Docker engine answers on $sock and dockerd is not installed; install docker.io (as root) or start your engine" >&2
    exit 1
  fi
  echo "docker engine: installing Debian's docker.io"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq docker.io >/dev/null
fi
if [ "$(id -u)" != 0 ]; then echo "no Docker engine answers on $sock; start dockerd as root" >&2; exit 1; fi
echo "docker engine: starting dockerd (log: /var/log/radix-dockerd.log)"
(setsid dockerd >/var/log/radix-dockerd.log 2>&1 &)
for _ in $(seq 1 120); do
  if answers; then echo "docker engine: up"; exit 0; fi
  sleep 0.5
done
echo "dockerd did not answer within 60 s; last lines of /var/log/radix-dockerd.log:" >&2
tail -20 /var/log/radix-dockerd.log >&2
exit 1
