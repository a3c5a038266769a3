#!/usr/bin/env bash
# System tools the tests use (tests/test_netns.py builds network namespaces):
# `ip` (iproute2) and a packet filter (`iptables`, or `nft`).  Installs only
# what is missing, quietly, with apt-get.  Never fails the build: without
# these tools (or without root) the tests that need them skip, saying why.
set -u
export PATH="$PATH:/usr/sbin:/sbin"

have() { command -v "$1" >/dev/null 2>&1; }

missing=()
have ip || missing+=(iproute2)
have iptables || have nft || missing+=(iptables)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! have apt-get; then
  echo "note: ${missing[*]} missing (not root or no apt-get): the network-namespace tests will skip" >&2
  exit 0
fi
echo "installing ${missing[*]} with apt-get (for the network-namespace tests)" >&2
export DEBIAN_FRONTEND=noninteractive
out=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$out" 2>&1; then
  cat "$out" >&2
  echo "warning: could not install ${missing[*]}: the network-namespace tests will skip" >&2
fi
rm -f "$out"
exit 0
