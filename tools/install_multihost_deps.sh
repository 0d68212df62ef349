#!/usr/bin/env bash
# System packages for multi-node launches and for tests/test_launch_multihost.py:
#   openssh-server (sshd per test "node"), pdsh (the deepspeed launcher's default multi-node backend;
#   it pulls in the ssh client it needs), iproute2 (`ip netns`, veth pairs).
# Idempotent and non-interactive: does nothing when every tool is already there. Needs root (or sudo) and apt.
set -euo pipefail

need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v pdsh >/dev/null 2>&1 || need+=(pdsh)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)

if [ ${#need[@]} -eq 0 ]; then
  echo "install_multihost_deps: openssh-server, pdsh and iproute2 already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install_multihost_deps: need root (or sudo) to install: ${need[*]}" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_multihost_deps: no apt-get here; install these yourself: ${need[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Deduplicate (openssh-client may be listed twice).
mapfile -t pkgs < <(printf '%s\n' "${need[@]}" | sort -u)
echo "install_multihost_deps: installing ${pkgs[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${pkgs[@]}" >/dev/null
# The tests start their own sshd per network namespace; they do not need (or use) the system's ssh service.
echo "install_multihost_deps: done ($(command -v sshd || echo /usr/sbin/sshd), $(command -v pdsh), $(command -v ip))"
