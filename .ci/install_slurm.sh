#!/usr/bin/env bash
# Install the Debian SLURM + munge packages the slurm tests need (tests/test_slurm.py).
#
# Idempotent: does nothing when slurmctld, slurmd, sbatch and munged are already on PATH.
# Needs root (or passwordless sudo) and apt. It only installs packages: it starts no daemon
# and writes no configuration; tests/slurm_cluster.py starts a private cluster in a temp dir.
#
#   .ci/install_slurm.sh            # install if missing
#   .ci/install_slurm.sh --check    # exit 0 if installed, 1 if not (installs nothing)
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
NEEDED_BINARIES=(slurmctld slurmd sbatch srun scontrol squeue scancel munged)

have_all() {
    local b
    for b in "${NEEDED_BINARIES[@]}"; do
        # Debian puts the daemons in /usr/sbin, which is not always on a CI user's PATH.
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
}

if have_all; then
    echo "install_slurm: slurm and munge already installed (slurm $(dpkg-query -W -f="\${Version}" slurm-client 2>/dev/null || echo ?))"
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "install_slurm: slurm/munge not installed" >&2
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install_slurm: need root (or passwordless sudo) to apt-get install ${PACKAGES[*]}" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: apt-get not found; install ${PACKAGES[*]} with this system's package manager" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Package installs must not start daemons on this machine (Debian's postinst would try to
# start munge/slurm through invoke-rc.d); the tests start their own private instances.
POLICY=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod +x "$POLICY"
    made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

# apt-get update only when the package lists are missing or the install fails without it.
if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; then
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
fi

have_all || { echo "install_slurm: packages installed but binaries still missing" >&2; exit 1; }
echo "install_slurm: installed slurm $(dpkg-query -W -f="\${Version}" slurm-client 2>/dev/null || echo ?)"
