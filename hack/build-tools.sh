#!/usr/bin/env bash
# Build the local control plane's binaries from their published Go modules into .cache/bin.
# Each tool has a wrapper module under hack/tools/<tool>/ that pins its version; a tool is
# rebuilt only when its wrapper module or its build line changes, so a warm run is instant.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.cache/bin
mkdir -p "$BIN"
export GOFLAGS=-mod=mod

K8S_VERSION=v1.37.2   # keep in step with hack/tools/kubernetes/go.mod
K8S_LDFLAGS="-s -w \
 -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=37 \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=2026-01-01T00:00:00Z"

# Compiler flags: compiling is most of a cold build (7 of a cold `make run`'s 11 minutes on
# two cores). These binaries only run the local control plane, so:
# - -N -l: our tools' packages unoptimised and not inlined, a third less compiler work
#   (Kubernetes: 726 against 493 CPU-seconds) for about a quarter more apiserver CPU under load
#   and no change in `make test`'s time;
# - the Go standard library (runtime, GC, crypto, encoding) optimised, the later -gcflags
#   winning for it (with it unoptimised as well, the apiserver used twice the CPU);
# - -dwarf=false: no debug info, which -s -w strips at link anyway (bench/RESULTS.md).
GCFLAGS=(-gcflags="all=-dwarf=false -N -l" -gcflags="std=-dwarf=false")

# build TOOL OUTPUT LDFLAGS PACKAGE...
build() {
  local tool=$1 out=$2 ldflags=$3; shift 3
  local dir=hack/tools/$tool
  local stamp
  # Only this tool's wrapper module and build line: adding a tool rebuilds nothing else.
  stamp=$( (cat "$dir/go.mod" "$dir/go.sum"; echo "${GCFLAGS[*]} $ldflags $*") | sha256sum | cut -c1-16)
  if [[ -f $BIN/.stamp-$tool && $(cat "$BIN/.stamp-$tool") == "$stamp" ]]; then
    return 0
  fi
  echo ">> building $tool ($*)" >&2
  local start=$SECONDS
  if ! (cd "$dir" && go build -trimpath "${GCFLAGS[@]}" -ldflags "$ldflags" -o "$out" "$@"); then
    echo ">> building $tool failed" >&2
    return 1
  fi
  echo "$stamp" > "$BIN/.stamp-$tool"
  echo ">> built $tool in $((SECONDS - start))s" >&2
}

# build_tool TOOL: its build line.
build_tool() {
  case $1 in
    etcd)       build etcd "$BIN/etcd" "-s -w" go.etcd.io/etcd/server/v3 ;;
    # kwok with them: built against the same k8s.io modules, it shares 592 of its 758
    # packages with them, and one build compiles those once.
    kubernetes) build kubernetes "$BIN/" "$K8S_LDFLAGS" \
                  k8s.io/kubernetes/cmd/kube-apiserver \
                  k8s.io/kubernetes/cmd/kube-controller-manager \
                  k8s.io/kubernetes/cmd/kube-scheduler \
                  sigs.k8s.io/kwok/cmd/kwok ;;
    helm)       build helm "$BIN/helm" "-s -w" helm.sh/helm/v3/cmd/helm ;;
    versitygw)  build versitygw "$BIN/versitygw" "-s -w" github.com/versity/versitygw/cmd/versitygw ;;
    kueue)      build kueue "$BIN/kueue" "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=v0.19.2" sigs.k8s.io/kueue/cmd/kueue ;;
    *) echo "unknown tool: $1" >&2; return 2 ;;
  esac
}

# All tools at once: one Go build alone leaves the cores idle while it links or waits on a
# package it depends on (a cold sequential build used 1.7 of 2 cores); concurrent builds fill
# them (bench/RESULTS.md). The module and build caches are safe to share between them.
pids=()
for tool in ${*:-etcd kubernetes helm versitygw kueue}; do
  build_tool "$tool" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || failed=1
done
exit $failed
