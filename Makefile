# Radix cluster agent. `make test` is the test command (CI runs it through .ci/run).
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
IMAGE       ?= radix-cluster-agent:dev
BASE_IMAGE  ?=
CA_BUNDLE   ?=
# make push: REGISTRY=ghcr.io/acme [IMAGE_NAME=radix-cluster-agent] [RELEASE_TAG=v0.1.0]
REGISTRY    ?=
IMAGE_NAME  ?= radix-cluster-agent
RELEASE_TAG ?=
GIT_SHA     := $(shell git rev-parse HEAD 2>/dev/null)

.PHONY: help venv engine test-deps test unit-test integration-test podman-test demo demo-deps example-ml image push gpu-check gpu-lab-bundle bench profile-dispatch slurm-lab slurm-lab-stop clean

help:
	@echo "make test    unit + integration tests (starts a Docker engine if none answers), then the engine suite on Podman"
	@echo "make unit-test         the unit tests only (no engine, about 90 s)"
	@echo "make integration-test  the integration tests and the Podman engine suite"
	@echo "make podman-test   the engine suite alone, against a Podman service the tests start"
	@echo "make demo    dev control plane + agent + the jobs in examples/jobs, results printed"
	@echo "make image   build the agent's image ($(IMAGE)); BASE_IMAGE=... CA_BUNDLE=... optional"
	@echo "make push    REGISTRY=... build linux/amd64+arm64 with buildx and push (tags: git sha, RELEASE_TAG)"
	@echo "make bench   agent vs raw engine: overhead, dispatch latency, throughput, footprint (docs/benchmarks.md)"
	@echo "make profile-dispatch   py-spy profile of the path from poll answer to running container"
	@echo "                        (PROFILE_ARGS=\"--path finish\": from a container's exit to its result)"
	@echo "make slurm-lab  a two-node Slurm cluster here, to try --execution-mode slurm (docs/slurm.md)"
	@echo "make gpu-check  on a GPU host: the agent runs GPU-pinned jobs and checks what they see (docs/gpu.md)"
	@echo "make gpu-lab-bundle  build/gpu-lab/ for a GPU host with no Docker or network: then scripts/gpu_lab_run.sh there"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { echo "$(PYTHON) has no venv: installing Debian's python3-venv"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

engine:
	scripts/ensure-docker.sh

# busybox-static makes the local job image (no registry is needed); docker-registry and apache2-utils (htpasswd)
# run the private-registry tests; slurmctld, slurmd and munge the two-node Slurm cluster of the Slurm tests.
# debootstrap builds a Debian base for the agent's image where python:3.11-slim cannot be pulled.
# nginx (with WebDAV PUT) is the object store of the input and artifact tests (tests/object_store.py); prometheus
# (with promtool) checks and unit-tests deploy/prometheus and scrapes a running agent. podman (with catatonit, its
# --init, and runc, netavark, aardvark-dns) runs the engine suite a second time on Podman (tests/podman_service.py).
PODMAN_PACKAGES := podman catatonit runc netavark aardvark-dns
TEST_PACKAGES := busybox-static docker-registry apache2-utils openssl slurmctld slurmd slurm-client munge debootstrap nginx prometheus $(PODMAN_PACKAGES)
test-deps: venv engine
	@command -v busybox >/dev/null 2>&1 && command -v docker-registry >/dev/null 2>&1 && command -v htpasswd >/dev/null 2>&1 \
		&& command -v debootstrap >/dev/null 2>&1 && test -x /usr/sbin/nginx && command -v promtool >/dev/null 2>&1 \
		&& command -v sbatch >/dev/null 2>&1 && test -x /usr/sbin/slurmctld && test -x /usr/sbin/munged \
		&& command -v podman >/dev/null 2>&1 && test -x /usr/bin/catatonit || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_PACKAGES) >/dev/null; }
	$(PY) -m devplane.images

unit-test: venv
	$(PY) -m pytest -q tests --ignore=tests/integration

integration-test: test-deps
	AGENT_TEST_BASE_IMAGE="$(BASE_IMAGE)" AGENT_TEST_CA_BUNDLE="$(CA_BUNDLE)" $(PY) -m pytest -q tests/integration
	$(MAKE) --no-print-directory podman-test

# The engine suite (tests marked `engine`: run, output, timeout, cancel, OOM, logs, adoption, hardening) against a
# Podman service the tests start themselves; make test runs it after the Docker run.
podman-test: test-deps
	AGENT_TEST_ENGINE=podman $(PY) -m pytest -q tests/integration -m engine

test: test-deps
	AGENT_TEST_BASE_IMAGE="$(BASE_IMAGE)" AGENT_TEST_CA_BUNDLE="$(CA_BUNDLE)" $(PY) -m pytest -q tests
	$(MAKE) --no-print-directory podman-test

# The demo needs only the engine and busybox (its job image): not the Slurm, registry and TLS tools of the tests.
demo-deps: venv engine
	@command -v busybox >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null; }

demo: demo-deps
	$(PY) scripts/demo.py

# A real ML job (examples/sentiment/, VADER sentiment) built here and run through the dev control plane and the agent.
example-ml: demo-deps
	$(PY) scripts/example_ml.py

# A real two-node Slurm cluster on this machine (root): the Slurm tests start it themselves; this is for trying
# --execution-mode slurm by hand (docs/slurm.md). `make slurm-lab-stop` stops it.
slurm-lab: test-deps
	$(PY) scripts/slurm_lab.py start

slurm-lab-stop:
	$(PY) scripts/slurm_lab.py stop

image: venv engine
	$(PY) scripts/build_image.py --tag $(IMAGE) $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE)) $(if $(CA_BUNDLE),--ca-bundle $(CA_BUNDLE))

PUSH_NEEDS := make push needs Docker's buildx plugin (docker-buildx-plugin from Docker's apt repository; Debian's docker.io has none) and, for the arm64 half, QEMU user emulation (apt-get install qemu-user-static binfmt-support)
# By hand what .github/workflows/image.yml does: both architectures, tagged with the sha (and a release tag).
push:
	@test -n "$(REGISTRY)" || { echo "set REGISTRY=registry/namespace (and docker login to it first)"; exit 2; }
	@docker buildx version >/dev/null 2>&1 || { echo "$(PUSH_NEEDS)"; exit 2; }
	docker buildx build --platform linux/amd64,linux/arm64 \
		-t $(REGISTRY)/$(IMAGE_NAME):$(GIT_SHA) $(if $(RELEASE_TAG),-t $(REGISTRY)/$(IMAGE_NAME):$(RELEASE_TAG)) \
		--push .

# Benchmarks write docs/benchmarks.md; make test only runs them tiny (tests/integration/test_bench.py).
bench: test-deps
	$(PY) bench/run.py --out docs/benchmarks.md

# Where the agent's dispatch time goes (py-spy on the running agent; needs root for ptrace).
# PROFILE_ARGS="--path finish": the path from a container's exit to its complete request instead.
PROFILE_ARGS ?=
profile-dispatch: venv engine
	$(PY) -m pip install --quiet --disable-pip-version-check py-spy
	$(PY) bench/profile_dispatch.py $(PROFILE_ARGS)

gpu-check: test-deps
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# For a GPU machine with no Docker and no network: build/gpu-lab/ to carry there, then scripts/gpu_lab_run.sh.
gpu-lab-bundle: venv
	scripts/gpu_lab_bundle.sh $(GPU_LAB_DIR)

clean:
	rm -rf $(VENV) .pytest_cache
