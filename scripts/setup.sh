#!/usr/bin/env bash
# Set up cube-egress on a fresh Debian 12/13 machine as root: system packages and the .venv virtualenv.
# Idempotent: re-running installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  ca-certificates curl iproute2 nftables iputils-ping   # gateway, transparent mode, hermetic test networks
  iperf3                                                 # bench ebpf: TCP throughput through the tc guard
  squid nginx-light                                      # benchmark peer and upstream (bench/ has its own load generator)
  postgresql                                             # dynamic DB credentials tests (tests/support/postgres.py)
  python3-bpfcc bpfcc-tools bpftool                      # kernel enforcement (ebpf/): bcc compiles, bpftool inspects
  "linux-headers-$(dpkg --print-architecture)"           # headers bcc compiles against (linked below)
  qemu-system-x86 qemu-utils linux-image-cloud-amd64     # microVM sandboxes (hypervisor/): QEMU, qcow2, guest kernel
  busybox-static gcc libc6-dev libjansson-dev            # guest image: userland, and the static guest agent build
  e2fsprogs cpio                                         # guest root disks (mkfs.ext4 -d); cpio lists initramfs in tests
  "$(. /etc/os-release; [ "${VERSION_CODENAME:-}" = bookworm ] && echo libarchive13 || echo libarchive13t64)"  # -d TAR
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts these as services on install; tests and benchmarks run their own private instances.
  for svc in squid nginx postgresql; do
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
    if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
  done
  pkill -x squid 2>/dev/null || true
fi

# Python >= 3.12 (mitmproxy 12). pyenv's python3.12 shim fails unless PYENV_VERSION is set, so look for a real
# interpreter first and only then try names on PATH.
find_python() {
  local root c
  root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
  for c in "$root"/versions/3.12*/bin/python3.12 "$root"/versions/3.13*/bin/python3.13 \
           /usr/bin/python3.13 /usr/bin/python3.12 python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  PY="$(find_python)" || { echo "setup: no Python >= 3.12 found (install python3.12 or pyenv 3.12)" >&2; exit 1; }
  echo "setup: creating .venv with $PY"
  rm -rf .venv
  "$PY" -m venv .venv
fi

stamp=.venv/.cube-egress-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi
# -- kernel enforcement (ebpf/) --------------------------------------------------------------------------------
# bcc looks for the running kernel's headers in /lib/modules/$(uname -r)/build. A kernel without its own headers
# package (a VM's custom kernel) gets Debian's newest ones: tc and cgroup programs use only the stable interface.
rel="$(uname -r)"
if [ ! -e "/lib/modules/$rel/build/include" ]; then
  hdr="$(ls -d /usr/src/linux-headers-*-"$(dpkg --print-architecture)" 2>/dev/null | sort -V | tail -n 1 || true)"
  common="${hdr%-*}-common"
  if [ -n "$hdr" ] && [ -d "$hdr/include" ] && [ -d "$common" ] && [ "$(id -u)" = 0 ]; then
    mkdir -p "/lib/modules/$rel"
    ln -sfn "$hdr" "/lib/modules/$rel/build"
    ln -sfn "$common" "/lib/modules/$rel/source"
    echo "setup: no headers for kernel $rel; linked $hdr (and -common) for bcc"
  else
    echo "setup: WARNING: no kernel headers for $rel and none to link (install linux-headers-$(dpkg --print-architecture))" >&2
  fi
fi
# bcc is Debian's (python3-bpfcc, pure Python over libbcc): expose only it to the venv, through a folder of its own.
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -d /usr/lib/python3/dist-packages/bcc ]; then
  mkdir -p .venv/system-bcc
  ln -sfn /usr/lib/python3/dist-packages/bcc .venv/system-bcc/bcc
  # relative to site-packages, so the venv stays relocatable
  echo "$(realpath --relative-to="$site" .venv/system-bcc)" > "$site/cube_egress_bcc.pth"
fi
.venv/bin/python -c 'import pyroute2' 2>/dev/null || .venv/bin/python -m pip install -q --disable-pip-version-check 'pyroute2>=0.9'
if [ "$(id -u)" = 0 ]; then
  if reason="$(.venv/bin/python -W ignore -c 'import ebpf, sys; r = ebpf.unavailable_reason(); print(r or ""); sys.exit(1 if r else 0)' 2>/dev/null)"; then
    echo "setup: kernel enforcement (ebpf): this kernel ($rel) compiles and loads the programs"
  else
    echo "setup: WARNING: kernel enforcement (ebpf) is UNAVAILABLE on kernel $rel: ${reason:-bcc failed to start}" >&2
    echo "setup: WARNING: 'cube-egress sandbox attach' will refuse; '--enforcer nftables' is the explicit, reduced fallback" >&2
  fi
fi
echo "setup: ok ($(.venv/bin/python --version))"
