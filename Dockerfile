# The Radix cluster agent's image: the agent and its runtime dependencies, nothing else.
# BASE_IMAGE: any image with Python 3.11+ and its venv module. `make image` uses this default when it is here or
# can be pulled, else a Debian base it builds locally (scripts/build_image.py says which).
ARG BASE_IMAGE=python:3.11-slim

# Stage 1: the virtual environment, built with pip; pip itself stays behind.
FROM ${BASE_IMAGE} AS venv
COPY requirements.txt /tmp/requirements.txt
COPY docker/extra-ca/ /tmp/extra-ca/
RUN if [ -s /tmp/extra-ca/ca-certificates.crt ]; then export PIP_CERT=/tmp/extra-ca/ca-certificates.crt; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile -r /tmp/requirements.txt \
 && /opt/venv/bin/pip uninstall --yes --disable-pip-version-check pip setuptools \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# Stage 2: the runtime: the base, the environment and the agent's code.
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    RADIX_HEALTHCHECK_BEACON=/tmp/radix-healthcheck.json
COPY --from=venv /opt/venv /opt/venv
WORKDIR /app
COPY main.py /app/main.py
COPY cluster_agent /app/cluster_agent

# The agent is PID 1 (exec form): SIGTERM from `docker stop` reaches its handler directly.
STOPSIGNAL SIGTERM
# /healthz of the agent in this container, wherever its flags put it (or, with --metrics-port 0, the liveness
# file its poll loop touches): the agent says where in $RADIX_HEALTHCHECK_BEACON (cluster_agent/healthcheck.py).
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["python3", "-m", "cluster_agent.healthcheck"]
ENTRYPOINT ["python3", "/app/main.py"]
