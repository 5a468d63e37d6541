#!/usr/bin/env bash
# Prepare a Debian bookworm host for safedeploy: packages, kernel headers for bcc, bpffs, podman quirks.
# Idempotent; run as root. Used by `make setup` (and so by `make demo`, `make test` and .ci/run).
set -euo pipefail

PKGS=(python3-bpfcc python3-venv python3-yaml bpftool linux-headers-amd64 runc podman
      busybox-static iproute2 iptables util-linux strace)
# the field tests (tests/field) run real resolvers and clients; their daemons must NOT run on the
# host (a dnsmasq on 0.0.0.0:53 or an nscd changes every lookup here): see below
FIELD_PKGS=(dnsmasq unbound bind9 bind9-dnsutils curl wget git nscd python3-requests python3-pip
            debootstrap)
PKGS+=("${FIELD_PKGS[@]}")
DAEMONS=(dnsmasq unbound named nscd)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # no service may start while installing (a policy-rc.d that says "no", unless one exists)
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
fi

# the resolver and cache daemons are test material only: stopped and disabled on the host
for d in "${DAEMONS[@]}"; do
  if [ -d /run/systemd/system ]; then
    systemctl disable --now "$d" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$d" ]; then
    "/etc/init.d/$d" stop >/dev/null 2>&1 || true
  fi
done

# bcc looks for headers at /lib/modules/$(uname -r)/{build,source}. A custom kernel has none:
# point it at Debian's newest header package (the uapi/bpf bits bcc needs are stable).
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include" ]; then
  build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$build" ] && [ -n "$common" ] || { echo "setup: no Debian kernel headers found" >&2; exit 1; }
  mkdir -p "$kdir"
  ln -sfn "$build" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  echo "setup: bcc headers $kdir/build -> $build" >&2
fi

# bpffs
if ! grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts 2>/dev/null && ! awk '$3=="bpf"' /proc/self/mounts | grep -q .; then
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi

# podman on this kind of VM refuses the default ulimits
conf=/etc/containers/containers.conf
if [ ! -f "$conf" ] || ! grep -q '^default_ulimits' "$conf"; then
  mkdir -p /etc/containers
  if [ -f "$conf" ] && grep -q '^\[containers\]' "$conf"; then
    sed -i '/^\[containers\]/a default_ulimits = []' "$conf"
  else
    printf '[containers]\ndefault_ulimits = []\n' >> "$conf"
  fi
fi
