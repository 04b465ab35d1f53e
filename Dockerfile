# syntax=docker/dockerfile:1
# The tagway gateway image: `docker build -t tagway:0.1.0 .` (the tag the Helm chart expects by default).
# Runs `tagway serve` as uid 10001 on the embedded store in the /var/lib/tagway volume; point it at a ClickHouse
# server with TAGWAY_STORAGE__DSN (compose.yaml does). The Python base is a build argument so the image can be
# built from a mirror: --build-arg PYTHON_IMAGE=registry.example.com/python:3.11-slim-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/tagway
WORKDIR /src
# the package metadata first: the dependency layer is rebuilt only when pyproject.toml changes
COPY pyproject.toml README.md ./
RUN mkdir gateway exporters replay \
    && touch gateway/__init__.py exporters/__init__.py replay/__init__.py \
    && /opt/tagway/bin/pip install --no-cache-dir . \
    && /opt/tagway/bin/pip uninstall --yes tagway
COPY gateway ./gateway
COPY exporters ./exporters
COPY replay ./replay
RUN /opt/tagway/bin/pip install --no-cache-dir --no-deps . \
    && /opt/tagway/bin/python -m compileall -q /opt/tagway/lib

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tagway" \
      org.opencontainers.image.description="OpenAI-compatible LLM gateway that records who asked and why in ClickHouse" \
      org.opencontainers.image.version="${VERSION}"
RUN groupadd --gid 10001 tagway \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/tagway --no-create-home --shell /usr/sbin/nologin tagway \
    && mkdir -p /var/lib/tagway /etc/tagway \
    && chown 10001:10001 /var/lib/tagway
COPY --from=build /opt/tagway /opt/tagway
COPY docker/tagway.yaml /etc/tagway/tagway.yaml
ENV PATH=/opt/tagway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    TAGWAY_CONFIG=/etc/tagway/tagway.yaml \
    HOME=/var/lib/tagway
USER 10001:10001
WORKDIR /var/lib/tagway
VOLUME ["/var/lib/tagway"]
EXPOSE 4000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TAGWAY_SERVER__PORT', '4000'), timeout=2)"]
ENTRYPOINT ["tagway"]
CMD ["serve"]
