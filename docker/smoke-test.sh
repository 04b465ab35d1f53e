#!/usr/bin/env bash
# Build the image with podman and check that it serves: `bash docker/smoke-test.sh` (root, Debian).
#
# Needs only Debian's packages (podman, debootstrap) and the package index, no Docker daemon and no Docker Hub:
# when PYTHON_IMAGE is not given and docker.io cannot be reached, the base image is made here from Debian bookworm
# (python3 3.11 + venv, like python:3.11-slim-bookworm) with debootstrap. RUN steps use chroot isolation, which
# works where the OCI runtime cannot create cgroups (containers in VMs, CI sandboxes); where crun cannot start a
# container either (hybrid cgroups, no setrlimit), the container runs under runc with cgroupfs and lowered ulimits.
# Everything it starts binds 127.0.0.1 and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${TAG:-tagway:0.1.0}"
PORT="${PORT:-14000}"
NAME="tagway-smoke-$$"

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need podman podman
need curl curl

if [[ -z "${PYTHON_IMAGE:-}" ]]; then
  if podman pull -q docker.io/library/python:3.11-slim-bookworm >/dev/null 2>&1; then
    PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm
  else
    PYTHON_IMAGE=localhost/debian-python:3.11-bookworm
    if ! podman image exists "$PYTHON_IMAGE"; then
      need debootstrap debootstrap
      rootfs="$(mktemp -d)"
      trap 'rm -rf "$rootfs"' EXIT
      echo "building the base image $PYTHON_IMAGE from Debian bookworm (debootstrap)"
      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >/dev/null
      # this machine's CA bundle, so pip inside the build trusts whatever TLS the package index is reached through
      cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$PYTHON_IMAGE" >/dev/null
    fi
  fi
fi

echo "building $TAG on $PYTHON_IMAGE"
# docker format: the OCI image format has no HEALTHCHECK
podman build --format docker --isolation=chroot --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" -t "$TAG" .

RUN=(podman run)
if ! podman run --rm --network=none "$TAG" --version >/dev/null 2>&1; then
  need runc runc
  RUN=(podman --runtime runc --cgroup-manager cgroupfs run --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
  echo "crun cannot start containers here; running them with: ${RUN[*]}"
fi

echo "checking $TAG"
user="$(podman image inspect "$TAG" --format '{{.Config.User}}')"
[[ "$user" == "10001:10001" ]] || { echo "image user is '$user', want 10001:10001" >&2; exit 1; }
podman image inspect "$TAG" --format '{{json .Config.Healthcheck}}' | grep -q /healthz
version="$("${RUN[@]}" --rm --network=none "$TAG" --version)"
[[ "$version" == "tagway 0.1.0" ]] || { echo "tagway --version said '$version'" >&2; exit 1; }

cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
"${RUN[@]}" -d --name "$NAME" -p "127.0.0.1:$PORT:4000" \
  -e TAGWAY_ADMIN_KEY=tw-smoke-admin-0123456789abcdef "$TAG" >/dev/null
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/readyz"; echo
podman healthcheck run "$NAME" 2>/dev/null && echo "HEALTHCHECK: healthy"  # (its timers need systemd; this runs it)
answer="$(curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" \
  -H "Authorization: Bearer tw-smoke-admin-0123456789abcdef" -H "x-tagway-customer: demo" \
  -H "Content-Type: application/json" -d '{"model":"mock","messages":[{"role":"user","content":"ping"}]}')"
echo "$answer" | grep -q '"choices"' || { echo "unexpected answer: $answer" >&2; exit 1; }
curl -fsS "http://127.0.0.1:$PORT/metrics" | grep -q 'tagway_calls_total{'
podman logs "$NAME" 2>&1 | grep -q 'customer=demo' || { echo "no access log line" >&2; podman logs "$NAME"; exit 1; }
podman exec "$NAME" id -u | grep -qx 10001
podman stop -t 30 "$NAME" >/dev/null
[[ "$(podman inspect "$NAME" --format '{{.State.ExitCode}}')" == "0" ]] || { echo "unclean stop" >&2; exit 1; }
echo "smoke test passed: $TAG builds, runs as 10001, serves /v1 on the embedded store, logs and counts the call"
