#!/usr/bin/env bash
# Build CRIU from Debian's source of a newer suite and cache it outside the repository.
#
# Debian 12's criu (3.17) cannot dump on these kernels, and 4.1 cannot dump a TCP socket on
# Linux 6.16+ (SO_PASSCRED on an inet socket is EOPNOTSUPP there); 4.2 can. The upstream tarball
# comes from a private apt source list (the machine's own apt configuration is not touched), the
# build dependencies are bookworm's. RUNDIR is on a tmpfs: CRIU keeps its kernel-feature cache
# there only on tmpfs, and without it every call probes the kernel (~25-60 ms).
#
# Usage: deploy/criu.sh            prints the path of a working criu, building it if needed
# Env:   WAKEGATE_CACHE (default /var/cache/wakegate), CRIU_SUITE (sid), CRIU_MIN (4.2)
set -euo pipefail
cache=${WAKEGATE_CACHE:-/var/cache/wakegate}
suite=${CRIU_SUITE:-sid}
min=${CRIU_MIN:-4.2}
rundir=/dev/shm/wakegate-criu
runtime_deps="libprotobuf-c1 libnl-3-200 libnet1 libbsd0 libnftables1 libgnutls30 libuuid1 libcap2 iptables"
build_deps="libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler libnl-3-dev libcap-dev
  libnet1-dev libbsd-dev libnftables-dev libgnutls28-dev uuid-dev pkgconf python3-protobuf gcc make"

version_ok() {  # $1: a criu binary
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^Version: //p') || return 1
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$min" "$v" | sort -V | head -n1)" = "$min" ]
}

apt_install() {
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

for found in "$cache"/criu-*/criu; do
  if [ -x "$found" ]; then
    version_ok "$found" || apt_install $runtime_deps  # a cache kept across machines: its libraries
    if version_ok "$found"; then echo "$found"; exit 0; fi
  fi
done

[ "$(id -u)" = 0 ] || { echo "deploy/criu.sh: building CRIU needs root (apt-get)" >&2; exit 1; }
echo "deploy/criu.sh: building CRIU >= $min from Debian $suite's source into $cache" >&2
apt_install $build_deps $runtime_deps xz-utils
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
uri=${uri:-http://deb.debian.org/debian}
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb-src $uri $suite main" > "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives")
apt-get -qq "${apt_opts[@]}" update >/dev/null
# The .orig tarball is all the build needs; the .debian part is sometimes missing from the mirror.
(cd "$work" && apt-get -qq "${apt_opts[@]}" source --download-only criu >/dev/null 2>&1) || true
tarball=$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | head -n1)
[ -n "$tarball" ] || { echo "deploy/criu.sh: no criu source in Debian $suite" >&2; exit 1; }
tar -C "$work" -xf "$tarball"
src=$(ls -d "$work"/criu-*/ | head -n1)
make -C "$src" -j"$(nproc)" criu RUNDIR="$rundir" >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log" >&2; exit 1; }
version=$("$src/criu/criu" --version | sed -n 's/^Version: //p')
mkdir -p "$cache/criu-$version"
install -m 0755 "$src/criu/criu" "$cache/criu-$version/criu"
version_ok "$cache/criu-$version/criu" || { echo "deploy/criu.sh: built CRIU $version is older than $min" >&2; exit 1; }
echo "$cache/criu-$version/criu"
