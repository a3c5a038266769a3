#!/usr/bin/env bash
# System packages the build and the tests need, installed (quietly, with apt-get) only when
# missing.  Runs BEFORE pip: pyfuse3 is built against libfuse 3.
#  - fuse3, libfuse3-dev, pkg-config: pyfuse3 (the BFS mount, `pbft mount`) compiles against
#    libfuse3 and mounts with fusermount3;
#  - `ip` (iproute2) and a packet filter (`iptables`, or `nft`): tests/test_netns.py;
#  - sshfs and sshd (openssh-server): `pbft bench-fs` compares BFS with sshfs over loopback
#    (it starts its own sshd; the package's own service is not started here).
# Never fails the build: without these (or without root) the tests that need them skip,
# saying why; without libfuse3-dev the pip install of pyfuse3 fails and says so.
set -u
export PATH="$PATH:/usr/sbin:/sbin"

have() { command -v "$1" >/dev/null 2>&1; }

missing=()
have pkg-config || missing+=(pkg-config)
have fusermount3 || missing+=(fuse3)
{ have pkg-config && pkg-config --exists fuse3; } || missing+=(libfuse3-dev)
have ip || missing+=(iproute2)
have iptables || have nft || missing+=(iptables)
have sshfs || missing+=(sshfs)
have sshd || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! have apt-get; then
  echo "note: ${missing[*]} missing (not root or no apt-get): install them (the FUSE mount needs fuse3," \
       "libfuse3-dev and pkg-config to build pyfuse3; the network-namespace tests skip without iproute2)" >&2
  exit 0
fi
echo "installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
out=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$out" 2>&1; then
  cat "$out" >&2
  echo "warning: could not install ${missing[*]}" >&2
fi
rm -f "$out"
exit 0
