# ebpf-sticky for containers: a small production image (no compiler: the native and cbpf routers
# build their programs in Python; only the build stage compiles the C head search of
# --session-key). The master runs as PID 1 and drops every worker to the unprivileged user
# `sticky`. Serve your app by building FROM this image:
#   FROM ebpf-sticky
#   COPY app.py /app/app.py
# and run it with the privileges the router needs (docs/how-to/deploy-container.md):
#   podman run --cap-drop ALL --cap-add BPF --cap-add SETUID --cap-add SETGID --cap-add KILL \
#     --security-opt seccomp=deploy/seccomp/ebpf-sticky.json -p 8000:8000 ebpf-sticky
# Build arguments: BASE (any Debian-based image with python3 and its venv module), PIP_OPTIONS
# (e.g. "--no-index --find-links /wheels" with `podman build -v DIR:/wheels` where PyPI is out of reach),
# COMPILER (the build stage's apt packages for the C head search; empty where apt is out of reach:
# the same search then runs in Python, about a microsecond a request slower with --session-key).
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG PIP_OPTIONS=""
ARG COMPILER="gcc libc6-dev"
RUN if [ -n "$COMPILER" ]; then \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends $COMPILER >/dev/null; \
    fi
COPY pyproject.toml setup.py README.md LICENSE /src/
COPY ebpf_sticky /src/ebpf_sticky
RUN python3 -m venv /opt/ebpf-sticky \
 && /opt/ebpf-sticky/bin/pip install --no-cache-dir ${PIP_OPTIONS} /src \
 && /opt/ebpf-sticky/bin/pip uninstall --yes setuptools pip

# Only the virtualenv crosses over: no sources, no build tools, no pip cache.
FROM ${BASE}
COPY --from=build /opt/ebpf-sticky /opt/ebpf-sticky
COPY examples/hello/app.py /app/app.py
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sticky
# Every launch option has an EBPF_STICKY_* twin: these are the container's defaults, each
# overridable with `-e`. The graceful timeout stays under the runtimes' default stop timeout
# (10 s: docker/podman stop, then SIGKILL), so a stop finishes its requests and exits 0.
ENV PATH=/opt/ebpf-sticky/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EBPF_STICKY_BIND=0.0.0.0:8000 \
    EBPF_STICKY_USER=sticky \
    EBPF_STICKY_GRACEFUL_TIMEOUT=8
WORKDIR /app
EXPOSE 8000
STOPSIGNAL SIGTERM
# The master answers on its control socket while it supervises; HEALTHCHECK needs the docker
# image format (podman build --format docker).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s CMD ["ebpf-sticky", "status"]
ENTRYPOINT ["ebpf-sticky", "launch"]
CMD ["app.py"]
