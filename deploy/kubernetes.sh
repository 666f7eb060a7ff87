#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler),
# and a kubelet with the pod sandbox's pause program, from Debian's source package and cache them
# outside the repository; etcd comes from Debian as is.
#
# No registry these machines reach ships Kubernetes binaries, but bookworm's `kubernetes` source
# package is the whole 1.20.2 tree with its vendor/ folder, which builds offline with Debian's Go.
# The v1 APIs a node agent uses (Node, Pod and its status, Lease, Deployment and its scale,
# Endpoints) are the same in current releases. One patch: the vendored modern-go/reflect2 1.0.1
# crashes under Go >= 1.18, so its files are replaced by those of Debian's reflect2 1.0.2.
# The source list is private (the machine's apt configuration is not touched). A build takes
# 4-8 minutes on 2 cores and 1.4 GB of RAM; a rerun finds the cache and prints it at once.
#
# Usage: deploy/kubernetes.sh      prints the folder holding the three binaries, building if needed
# Env:   WAKEGATE_CACHE (default /var/cache/wakegate)
set -euo pipefail
cache=${WAKEGATE_CACHE:-/var/cache/wakegate}
version=1.20.5+really1.20.2-1.1+deb12u1
out="$cache/kubernetes-1.20.2-1"  # -N: the build's own revision (patches), so a changed build is made again
binaries="kube-apiserver kube-controller-manager kube-scheduler kubelet pause"
runtime_deps="etcd-server etcd-client openssl iproute2"

apt_install() {
  apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null
}

complete() {
  for b in $binaries; do [ -x "$out/$b" ] || return 1; done
  command -v etcd >/dev/null && command -v openssl >/dev/null && command -v ip >/dev/null
}

if [ -x "$out/kube-apiserver" ] && ! complete; then
  [ "$(id -u)" = 0 ] && apt_install $runtime_deps  # a cache kept across machines: etcd and openssl
fi
if complete; then echo "$out"; exit 0; fi

[ "$(id -u)" = 0 ] || { echo "deploy/kubernetes.sh: building Kubernetes needs root (apt-get)" >&2; exit 1; }
echo "deploy/kubernetes.sh: building Kubernetes 1.20.2 from Debian's source into $out (4-8 min)" >&2
apt_install golang-go rsync make gcc libc6-dev $runtime_deps
go_bin=$(ls -d /usr/lib/go-1.*/bin 2>/dev/null | sort -V | tail -n1)
[ -n "$go_bin" ] || { echo "deploy/kubernetes.sh: no Go in /usr/lib/go-1.*" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/wakegate-k8s.XXXXXX")
trap 'rm -rf "$work"' EXIT
uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
uri=${uri:-http://deb.debian.org/debian}
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb-src $uri bookworm main" > "$work/sources.list"
echo "deb $uri bookworm main" >> "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives")
apt-get -qq "${apt_opts[@]}" update >/dev/null 2>&1
(cd "$work" && apt-get -qq "${apt_opts[@]}" source --download-only "kubernetes=$version" >/dev/null 2>&1) || true
tarball=$(ls "$work"/kubernetes_*.orig.tar.* 2>/dev/null | head -n1)
[ -n "$tarball" ] || { echo "deploy/kubernetes.sh: no kubernetes $version source in Debian bookworm" >&2; exit 1; }
(cd "$work" && apt-get -qq "${apt_opts[@]}" download golang-github-modern-go-reflect2-dev >/dev/null 2>&1) || true
reflect=$(ls "$work"/golang-github-modern-go-reflect2-dev_*.deb 2>/dev/null | head -n1)
[ -n "$reflect" ] || { echo "deploy/kubernetes.sh: no golang-github-modern-go-reflect2-dev in bookworm" >&2; exit 1; }
mkdir -p "$work/src" "$work/reflect2"
tar -C "$work/src" -xf "$tarball"
src=$(dirname "$(find "$work/src" -maxdepth 3 -name go.mod -path '*/src/*' | head -n1)")
[ -f "$src/cmd/kube-apiserver/apiserver.go" ] || { echo "deploy/kubernetes.sh: unexpected source layout" >&2; exit 1; }
dpkg-deb -x "$reflect" "$work/reflect2"
vendored="$src/vendor/github.com/modern-go/reflect2"
fixed=$(find "$work/reflect2" -type d -path '*github.com/modern-go/reflect2' | head -n1)
rm -f "$vendored"/*.go "$vendored"/*.s
cp "$fixed"/*.go "$fixed"/*.s "$vendored"/ 2>/dev/null || cp "$fixed"/*.go "$vendored"/
rm -f "$vendored"/*_test.go
# The kubelet gives every pod sandbox an oom_score_adj of -998, and lowering it below 0 takes
# CAP_SYS_RESOURCE, which the sandboxes of these machines do not grant: runc then fails every pod.
# The sandbox keeps the default (0) instead.
sandbox="$src/pkg/kubelet/dockershim/docker_sandbox.go"
grep -q 'defaultSandboxOOMAdj int = -998' "$sandbox" || { echo "deploy/kubernetes.sh: $sandbox has changed" >&2; exit 1; }
sed -i 's/defaultSandboxOOMAdj int = -998/defaultSandboxOOMAdj int = 0/' "$sandbox"
(cd "$src" && PATH="$go_bin:$PATH" CGO_ENABLED=0 GOFLAGS=-mod=vendor \
   make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet" >"$work/build.log" 2>&1) \
  || { tail -n 40 "$work/build.log" >&2; exit 1; }
# The pod sandbox's process (the "pause" container's), from the same tree: a kubelet beside the
# wakegate nodes runs its pods in real containers for the benchmark's Kubernetes path.
gcc -Os -static -DVERSION=v3.4-wakegate -o "$src/_output/bin/pause" "$src/build/pause/linux/pause.c" \
  || { echo "deploy/kubernetes.sh: cannot build pause" >&2; exit 1; }
mkdir -p "$out.tmp"
for b in $binaries; do install -m 0755 "$src/_output/bin/$b" "$out.tmp/$b"; done
rm -rf "$out" && mv "$out.tmp" "$out"
for old in "$cache"/kubernetes-1.20.2*; do  # earlier revisions of this build
  [ "$old" = "$out" ] || rm -rf "$old"
done
complete || { echo "deploy/kubernetes.sh: the build left no working binaries in $out" >&2; exit 1; }
echo "$out"
