#!/usr/bin/env bash
# Install Debian's Docker Engine (docker.io: dockerd, containerd, runc) and gVisor's runsc, without
# starting anything.
#
# wakegate's Docker backend talks to an Engine somebody runs; the tests start their own dockerd on
# a private socket, data root and exec root (tests/test_docker.py), so the host's daemon is neither
# needed nor touched: the package's init scripts are kept from starting one during the install
# (a policy-rc.d that refuses, removed afterwards). A default dockerd in bridge mode would leave
# iptables chains, a DROP policy on FORWARD and ip_forward=1 behind.
#
# Usage: deploy/docker.sh     prints the path of dockerd, installing it if needed
set -euo pipefail
if command -v dockerd >/dev/null && command -v containerd >/dev/null && [ -x /usr/bin/docker ] \
   && command -v runsc >/dev/null; then
  command -v dockerd
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "deploy/docker.sh: installing docker.io needs root (apt-get)" >&2; exit 1; }
policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 0755 "$policy"
  ours=1
fi
trap '[ "$ours" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io runsc busybox-static >/dev/null
command -v dockerd
