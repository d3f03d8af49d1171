# pgmux container image. Build it with deploy/docker/build-image (docker or podman): it
# builds pgmux's wheels on the host, puts them in a build context and runs this file.
# The build itself needs no network: pip installs from those wheels only.
#
# BASE: any image with python3 (3.11, the version the wheels are built for) and
# python3 -m venv on PATH: python:3.11-slim-bookworm, or Debian bookworm's own python3.
# Both stages use it, so the venv's python symlink resolves in the final image.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
COPY wheels/ /wheels/
# pip and setuptools leave the venv once pgmux is in (a third of its size); nothing in
# the image installs anything.
RUN python3 -m venv /opt/pgmux \
    && /opt/pgmux/bin/pip install --no-cache-dir --no-index --find-links /wheels pgmux \
    && /opt/pgmux/bin/pip uninstall --yes pip setuptools \
    && /opt/pgmux/bin/pgmux --version

FROM ${BASE}
# A numeric USER, so Kubernetes' runAsNonRoot can tell it is not root.
RUN useradd --no-log-init --user-group --uid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin pgmux \
    && mkdir /etc/pgmux
COPY --from=build /opt/pgmux /opt/pgmux
# PGMUX_*: the config as env vars (README, "Configuration"); in a container pgmux must
# listen beyond loopback. Mount a config file at /etc/pgmux/pgmux.toml and pass
# --config /etc/pgmux/pgmux.toml (or set PGMUX_CONFIG), or configure it all by env.
ENV PATH=/opt/pgmux/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PGMUX_LISTEN_ADDR=0.0.0.0 \
    PGMUX_METRICS_LISTEN_ADDR=0.0.0.0
USER 10001:10001
EXPOSE 6432 9127
# No curl in slim images: pgmux's own stdlib check of /healthz on the metrics port.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["pgmux", "healthcheck"]
# Exec form, no shell: pgmux is PID 1 and gets SIGTERM itself (graceful shutdown:
# transactions in flight finish, up to shutdown_timeout) and SIGHUP (reload).
ENTRYPOINT ["pgmux"]
