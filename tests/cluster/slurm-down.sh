#!/usr/bin/env bash
# Stop the cluster tests/cluster/slurm-up.sh started: slurmd, slurmctld, slurmdbd, munged, and MariaDB if
# slurm-up.sh started it. Jobs still running are killed with slurmd. Configs, accounting data and installed
# packages stay (the next slurm-up.sh is quick). Idempotent.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "slurm-down.sh: needs root (or passwordless sudo)" >&2; exit 1; }
    exec sudo -n -E "$0" "$@"
fi
STATE=/run/newllm-slurm

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {  # stop PIDFILE: SIGTERM, then wait up to 30 s for it to exit
    local i
    alive "$1" || return 0
    kill "$(cat "$1")"
    for i in $(seq 150); do
        alive "$1" || return 0
        sleep 0.2
    done
    echo "slurm-down: $(cat "$1") ($1) still running after 30 s" >&2
    return 1
}

stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/slurmdbd.pid
stop /run/munge/munged.pid
if [ -e "$STATE/mariadb" ]; then
    /etc/init.d/mariadb stop >/dev/null
    rm -f "$STATE/mariadb"
fi
echo "slurm-down: stopped"
