#!/usr/bin/env bash
# Everything qmpvm needs on a fresh Debian 12 machine: QEMU, the guest's
# kernel and busybox, and a venv at .venv with qmpvm and its test tools.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
compgen -G "/boot/vmlinuz-*-cloud-amd64" >/dev/null || need+=(linux-image-cloud-amd64)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" || need+=(busybox-static)
command -v ip >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl)  # tests: TLS monitors
python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv)
# libvirt, for the test that drives qmpvm-system-x86_64 with it: the daemon
# and its QEMU driver only (no systemd, polkit or libvirt-daemon-system)
libvirt=()
command -v libvirtd >/dev/null || libvirt+=(libvirt-daemon libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || libvirt+=(libvirt-clients)
if ((${#need[@]} + ${#libvirt[@]})); then
    echo "setup: installing ${need[*]} ${libvirt[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    if ((${#need[@]})); then
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    if ((${#libvirt[@]})); then
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${libvirt[@]}" >/dev/null
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.qmpvm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing qmpvm into .venv" >&2
    .venv/bin/pip install -q --upgrade pip >/dev/null
    # compat: a plain path entry; the default editable finder costs ~15 ms per start
    .venv/bin/pip install -q -e '.[dev]' --config-settings editable_mode=compat
    touch "$stamp"
fi
# Bytecode for qmpvm's own modules, even where PYTHONDONTWRITEBYTECODE is
# set: compiling them at every start would cost 25-40 ms before the greeting.
.venv/bin/python -m compileall -q qmpvm
