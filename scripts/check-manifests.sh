#!/usr/bin/env bash
# Checks the Kubernetes manifests in deploy/kubernetes without a cluster:
#
# - every overlay (each directory under deploy/kubernetes/overlays/, or the directories
#   given as arguments) renders with `kubectl kustomize`;
# - the output validates against the Kubernetes JSON schemas that the PyPI package
#   kubernetes-validate bundles, strictly (an unknown field is an error) and with no kind
#   left unchecked (a kind or apiVersion it has no schema for is an error too);
# - every namespaced object has a namespace, and every ConfigMap a pod refers to is in
#   the output (a reference kustomize did not resolve keeps the unhashed name);
# - every trainmesh image is tagged with the workspace version (Cargo.toml), which is
#   what the image build tags.
#
#   scripts/check-manifests.sh [OVERLAY_DIR...]
#
# Needs kubectl on PATH, one whose built-in kustomize knows components (kubectl 1.32 is
# what CI has; Debian 12's kubernetes-client, 1.20, is too old). The validator is
# installed with `pip --target` into a cache dir, like .ci/run installs buf: no dependence
# on where pip puts scripts and no clash with Debian's externally-managed Python (PEP 668).
# Which flags and variables the manifests pass is checked by the Rust test
# tests/tests/deploy_flags.rs, against the binaries' --help.
#
# Settings (environment):
#   KUBERNETES_VALIDATE_VERSION  the validator's version        (default 1.37.0)
#   K8S_VERSION                  Kubernetes version to check against (default 1.30.0)
set -euo pipefail

KUBERNETES_VALIDATE_VERSION=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
K8S_VERSION=${K8S_VERSION:-1.30.0}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

die() {
  echo "check-manifests: $*" >&2
  exit 1
}

if ! command -v kubectl >/dev/null 2>&1; then
  die "kubectl not found on PATH; it renders the overlays (kubectl kustomize).
Install a recent kubectl from the Kubernetes release packages. Debian 12's
kubernetes-client package (1.20) is too old: its kustomize knows no components."
fi

PY=$(command -v python3 || command -v python || true)
[[ -n "$PY" ]] || die "python3 not found; the schema validator (kubernetes-validate) is Python"

VALIDATOR_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/trainmesh-ci/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"

validator_version() {
  PYTHONPATH="$VALIDATOR_DIR" "$PY" -c \
    'import kubernetes_validate.version as v; print(v.__version__)' 2>/dev/null || true
}

if [[ "$(validator_version)" != "$KUBERNETES_VALIDATE_VERSION" ]]; then
  echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VALIDATOR_DIR"
  rm -rf "$VALIDATOR_DIR"
  "$PY" -m pip install --disable-pip-version-check --no-input --quiet --root-user-action=ignore \
    --target "$VALIDATOR_DIR" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  got=$(validator_version)
  [[ "$got" == "$KUBERNETES_VALIDATE_VERSION" ]] ||
    die "kubernetes-validate in $VALIDATOR_DIR says '$got', expected $KUBERNETES_VALIDATE_VERSION"
fi

# The workspace version: [workspace.package] version in Cargo.toml.
WORKSPACE_VERSION=$(awk '
  /^\[/ { in_pkg = ($0 == "[workspace.package]") }
  in_pkg && /^version *=/ { gsub(/.*= *"|".*/, ""); print; exit }
' Cargo.toml)
[[ -n "$WORKSPACE_VERSION" ]] || die "no [workspace.package] version in Cargo.toml"

if [[ $# -gt 0 ]]; then
  OVERLAYS=("$@")
else
  OVERLAYS=()
  for d in deploy/kubernetes/overlays/*/; do
    OVERLAYS+=("${d%/}")
  done
fi
[[ ${#OVERLAYS[@]} -gt 0 ]] || die "no overlays under deploy/kubernetes/overlays"

echo "kubectl $(kubectl version --client 2>/dev/null | sed -n 's/^Client Version: //p')," \
  "kubernetes-validate $KUBERNETES_VALIDATE_VERSION, Kubernetes $K8S_VERSION schemas," \
  "images tagged $WORKSPACE_VERSION"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

failed=0
for overlay in "${OVERLAYS[@]}"; do
  bad=0
  out="$WORK/$(basename "$overlay").yaml"
  if ! kubectl kustomize "$overlay" >"$out" 2>"$WORK/err"; then
    echo "FAIL $overlay: kubectl kustomize failed:" >&2
    sed 's/^/  /' "$WORK/err" >&2
    failed=1
    continue
  fi

  # --quiet prints only problems: ERROR lines (and exit 1) for what breaks a schema,
  # WARN lines (and exit 0) for kinds it has no schema for, which here means a typo.
  report=$(PYTHONPATH="$VALIDATOR_DIR" "$PY" -m kubernetes_validate \
    --kubernetes-version "$K8S_VERSION" --strict --quiet "$out" 2>&1) || true
  if [[ -n "$report" ]]; then
    echo "FAIL $overlay: does not validate against Kubernetes $K8S_VERSION:" >&2
    printf '%s\n' "$report" | sed "s#$out#$overlay#; s/^/  /" >&2
    bad=1
  fi

  # Objects outside the namespace, and ConfigMaps referred to but not there. PyYAML
  # comes with the validator.
  refs=$(PYTHONPATH="$VALIDATOR_DIR" "$PY" - "$out" <<'PY'
import sys, yaml
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "PriorityClass", "RuntimeClass", "CustomResourceDefinition",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
config_maps = {(d["metadata"].get("namespace"), d["metadata"]["name"])
               for d in docs if d["kind"] == "ConfigMap"}
def pod_spec(d):
    spec = d.get("spec") or {}
    if d["kind"] == "Pod":
        return spec
    if d["kind"] == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    return (spec.get("template") or {}).get("spec")
for d in docs:
    kind, meta = d["kind"], d["metadata"]
    what = "%s/%s" % (kind, meta["name"])
    ns = meta.get("namespace")
    if kind not in CLUSTER_SCOPED and not ns:
        print("%s has no namespace" % what)
    pod = pod_spec(d)
    if not pod:
        continue
    names = [v["configMap"]["name"] for v in pod.get("volumes") or [] if "configMap" in v]
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        names += [f["configMapRef"]["name"] for f in c.get("envFrom") or [] if "configMapRef" in f]
        names += [e["valueFrom"]["configMapKeyRef"]["name"] for e in c.get("env") or []
                  if "configMapKeyRef" in (e.get("valueFrom") or {})]
    for name in names:
        if (ns, name) not in config_maps:
            print("%s refers to ConfigMap %s, which is not in namespace %s of the output"
                  % (what, name, ns or "(none)"))
PY
  )
  if [[ -n "$refs" ]]; then
    echo "FAIL $overlay:" >&2
    printf '%s\n' "$refs" | sed 's/^/  /' >&2
    bad=1
  fi

  # Images: `image: [REGISTRY/]trainmesh/NAME:TAG`.
  images=$(sed -n -E 's/^[[:space:]-]*image:[[:space:]]*"?([^"[:space:]]+)"?.*/\1/p' "$out" |
    grep -E '(^|/)trainmesh/[^/]+$' | sort -u || true)
  if [[ -z "$images" ]]; then
    echo "FAIL $overlay: no trainmesh/<binary> image in the output" >&2
    bad=1
  fi
  while IFS= read -r image; do
    [[ -n "$image" ]] || continue
    tag=${image##*:}
    if [[ "$image" != *:* || "$tag" == */* || "$tag" != "$WORKSPACE_VERSION" ]]; then
      echo "FAIL $overlay: image $image is not tagged $WORKSPACE_VERSION (the workspace version)" >&2
      bad=1
    fi
  done <<<"$images"

  if [[ $bad -ne 0 ]]; then
    failed=1
  else
    echo "ok   $overlay: $(grep -c '^kind:' "$out" || true) objects"
  fi
done

if [[ $failed -ne 0 ]]; then
  exit 1
fi
echo "check-manifests: all ${#OVERLAYS[@]} overlays render and validate"
