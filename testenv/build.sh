#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager) from the Go module proxy
# and prints the folder holding the binaries. Idempotent: a complete cached build is reused as it is.
#
#   testenv/build.sh          the control plane; prints the folder
#   testenv/build.sh helm     helm (the tests render charts/ with it); prints the binary's path
#
# Environment:
#   KUBEBUILDER_ASSETS            use this folder's binaries instead of building (envtest convention)
#   ENDPOINTS_OPERATOR_TESTENV_CACHE  cache root (default: ${XDG_CACHE_HOME:-~/.cache}/endpoints-operator/testenv)
#   TEST_ASSET_ETCD, TEST_ASSET_KUBE_APISERVER, TEST_ASSET_KUBE_CONTROLLER_MANAGER  per-binary overrides
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.17}"
HELM_VERSION="${HELM_VERSION:-v4.3.2}"
BINARIES=(etcd kube-apiserver kube-controller-manager)

log() { printf 'testenv: %s\n' "$*" >&2; }
die() { printf 'testenv: error: %s\n' "$*" >&2; exit 1; }

cache_root="${ENDPOINTS_OPERATOR_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/endpoints-operator/testenv}"

# helm's own go.mod pins its dependencies and has no replace lines, so `go install pkg@version`
# builds exactly that release. Its own lock: it never waits for a control plane build.
build_helm() {
  local out="$cache_root/helm-$HELM_VERSION"
  if [[ -x "$out/helm" ]]; then printf '%s\n' "$out/helm"; return; fi
  command -v go >/dev/null || die "the Go toolchain is needed to build helm (go not on PATH)"
  mkdir -p "$out"
  exec 8>"$cache_root/.lock-helm"
  flock 8
  if [[ -x "$out/helm" ]]; then printf '%s\n' "$out/helm"; return; fi
  log "building helm $HELM_VERSION (a cold build takes a few minutes)"
  rm -rf "$out/tmp"
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$out/tmp" GOFLAGS=-mod=mod go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" >&2
  mv "$out/tmp/helm" "$out/helm"
  rmdir "$out/tmp"
  printf '%s\n' "$out/helm"
}

case "${1:-}" in
  "") ;;
  helm) build_helm; exit 0 ;;
  *) die "unknown argument ${1}; expected nothing or: helm" ;;
esac

have_all() {
  local dir="$1" b
  for b in "${BINARIES[@]}"; do [[ -x "$dir/$b" ]] || return 1; done
}

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  have_all "$KUBEBUILDER_ASSETS" || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks one of: ${BINARIES[*]}"
  printf '%s\n' "$KUBEBUILDER_ASSETS"
  exit 0
fi

command -v go >/dev/null || die "the Go toolchain is needed to build the control plane (go not on PATH)"

out="$cache_root/kubernetes-$KUBE_VERSION-etcd-$ETCD_VERSION"
if have_all "$out"; then
  printf '%s\n' "$out"
  exit 0
fi
mkdir -p "$out"
work="$cache_root/work"
mkdir -p "$work"

# One build at a time per cache folder (parallel test binaries may all call this).
exec 9>"$cache_root/.lock"
flock 9
if have_all "$out"; then printf '%s\n' "$out"; exit 0; fi

export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

build_kubernetes() {
  local dir="$work/kubernetes-$KUBE_VERSION" minor staging_version upstream
  minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  staging_version="v0.${KUBE_VERSION#v1.}"
  mkdir -p "$dir"
  upstream="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  [[ -f "$upstream" ]] || die "could not download k8s.io/kubernetes@$KUBE_VERSION from the module proxy"
  {
    echo "module endpoints-operator.test/kubernetes-wrapper"
    echo
    grep -E '^go [0-9.]+$' "$upstream"
    grep -E '^godebug ' "$upstream" || true
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "tool ("
    echo "	k8s.io/kubernetes/cmd/kube-apiserver"
    echo "	k8s.io/kubernetes/cmd/kube-controller-manager"
    echo ")"
    echo
    echo "replace ("
    # Every staging module upstream requires at v0.0.0 is published under the matching v0 tag.
    grep -oE '^[[:space:]]+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$upstream" | awk -v v="$staging_version" '{print "\t" $1 " v0.0.0 => " $1 " " v}'
    echo ")"
  } >"$dir/go.mod"
  (cd "$dir" && go mod tidy >&2)
  local pkg="k8s.io/component-base/version" cgo="k8s.io/client-go/pkg/version" ldflags
  ldflags="-s -w"
  for p in "$pkg" "$cgo"; do
    ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  for b in kube-apiserver kube-controller-manager; do
    log "building $b $KUBE_VERSION (a cold build takes tens of minutes)"
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$out/$b.tmp" "k8s.io/kubernetes/cmd/$b" >&2)
    mv "$out/$b.tmp" "$out/$b"
  done
}

build_etcd() {
  local dir="$work/etcd-$ETCD_VERSION" upstream
  mkdir -p "$dir"
  upstream="$(go mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  [[ -f "$upstream" ]] || die "could not download go.etcd.io/etcd/server/v3@$ETCD_VERSION from the module proxy"
  {
    echo "module endpoints-operator.test/etcd-wrapper"
    echo
    grep -E '^go [0-9.]+$' "$upstream"
    echo
    echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    echo
    echo "tool go.etcd.io/etcd/server/v3"
  } >"$dir/go.mod"
  (cd "$dir" && go mod tidy >&2)
  log "building etcd $ETCD_VERSION"
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3 >&2)
  mv "$out/etcd.tmp" "$out/etcd"
}

[[ -x "$out/etcd" ]] || build_etcd
[[ -x "$out/kube-apiserver" && -x "$out/kube-controller-manager" ]] || build_kubernetes
have_all "$out" || die "build finished but binaries are missing in $out"
log "control plane binaries ready in $out"
printf '%s\n' "$out"
