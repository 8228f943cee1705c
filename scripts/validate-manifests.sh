#!/usr/bin/env bash
# Renders every kustomize overlay in daemonset/ and validates it strictly against the
# Kubernetes schemas (unknown fields are errors).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# daemonset/uninstall/ is rendered and validated like an overlay.
for overlay in daemonset/overlays/*/ daemonset/uninstall/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" > "$out/$name.yaml"
  # As a module: a console script may not be on PATH (pyenv shims, user installs).
  python3 -m kubernetes_validate --strict --quiet "$out/$name.yaml"
  echo "manifests: $name renders and validates ($(grep -c '^kind:' "$out/$name.yaml") objects)"
done
