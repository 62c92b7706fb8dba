#!/usr/bin/env bash
# A single-node SLURM cluster with accounting on this machine, for tests/test_slurm.py and for trying
# sweeps/on_slurm.yaml by hand (docs/cluster.md). Debian/Ubuntu, root (or passwordless sudo), no systemd needed.
#
#   tests/cluster/slurm-up.sh      # install what is missing, write the configs, start what is not running
#   tests/cluster/slurm-down.sh    # stop it again
#
# Idempotent: a second call with everything up only checks it. Every daemon talks over loopback
# (127.0.0.1, or MariaDB's Unix socket). What each setting is for is in docs/cluster.md; in short, without
# them a one-node cluster fails in these ways:
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none  no cgroups needed (containers, no systemd)
#   DefMemPerCPU          a job that asks no memory would otherwise get the whole node, so jobs run one at a time
#   EnforcePartLimits=ALL a job asking more than the node has is refused at sbatch instead of pending forever
#   slurmdbd accounting   submitit polls sacct; without it a job that dies without a result is polled forever
# Environment: SLURM_CLUSTER (default newllm), SLURM_PARTITION (default debug), SLURM_UP_TIMEOUT (s, default 60).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "slurm-up.sh: needs root (or passwordless sudo)" >&2; exit 1; }
    exec sudo -n -E "$0" "$@"
fi

CLUSTER=${SLURM_CLUSTER:-newllm}
PARTITION=${SLURM_PARTITION:-debug}
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
HOST=$(hostname -s)
ETC=/etc/slurm
STATE=/run/newllm-slurm  # what this script started (slurm-down.sh stops only that)
T0=$(date +%s)

say() { echo "slurm-up: $*"; }
elapsed() { echo "$(($(date +%s) - $1)) s"; }

alive() {  # alive PIDFILE: the process named in it runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for WHAT COMMAND...: retry COMMAND for up to $TIMEOUT s
    local what=$1 deadline=$(($(date +%s) + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "slurm-up: $what not ready after ${TIMEOUT} s (logs: /var/log/slurm/, /var/log/munge/)" >&2
            return 1
        fi
        sleep 0.5
    done
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    [ ${#missing[@]} = 0 ] && return
    local t
    t=$(date +%s)
    say "installing ${missing[*]}"
    apt-get update -q >/dev/null
    # Debian's postinst writes /etc/munge/munge.key; the daemons are started below, not by the packages.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    say "installed in $(elapsed "$t")"
}

# ----------------------------------------------------------------------------- configuration
node_line() {  # this machine as slurmd sees it: CPUs, sockets, cores, threads, RealMemory (MiB)
    slurmd -C | head -1 | sed -e "s/^NodeName=[^ ]*/NodeName=$HOST NodeAddr=127.0.0.1/"
}

write_slurm_conf() {
    local node mem cpus listen=NoInAddrAny
    node=$(node_line)
    # slurmctld binds to the address the host name resolves to: only where that is loopback too
    [[ "$(getent hosts "$HOST")" =~ ^127\. ]] && listen=NoInAddrAny,NoCtldInAddrAny
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    cat <<EOF
# Written by tests/cluster/slurm-up.sh: one node, $HOST, over loopback.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Listen on the loopback addresses named here, not on every interface.
CommunicationParameters=$listen
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
EnforcePartLimits=ALL
ReturnToService=2
# SIGKILL 5 s after scancel's SIGTERM (default 30): submitit's job process ignores SIGTERM.
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
$node
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

db_password() {  # kept across calls: a running slurmdbd keeps using the one it read
    local pw
    pw=$(sed -n 's/^StoragePass=//p' "$ETC/slurmdbd.conf" 2>/dev/null || true)
    [ -n "$pw" ] || pw=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    echo "$pw"
}

write_slurmdbd_conf() {
    cat <<EOF
# Written by tests/cluster/slurm-up.sh: accounting for cluster $CLUSTER in MariaDB on this machine.
AuthType=auth/munge
CommunicationParameters=NoInAddrAny
DbdHost=$HOST
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$1
StorageLoc=slurm_acct_db
EOF
}

put() {  # put MODE DEST < content: replace DEST when the content differs; status 0 when it changed
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [ -f "$2" ] && cmp -s "$tmp" "$2"; then
        rm -f "$tmp"
        return 1
    fi
    install -m "$1" "$tmp" "$2"
    rm -f "$tmp"
}

configure() {  # status 0 when a SLURM config changed (running daemons must restart)
    local changed=1
    getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts
    mkdir -p "$ETC" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$STATE"
    write_slurm_conf | put 644 "$ETC/slurm.conf" && changed=0
    write_slurmdbd_conf "$(db_password)" | put 600 "$ETC/slurmdbd.conf" && changed=0
    printf '[mysqld]\nbind-address = 127.0.0.1\n# slurmdbd creates large tables in one transaction\ninnodb_lock_wait_timeout = 900\n' \
        | put 644 /etc/mysql/mariadb.conf.d/60-newllm-slurm.cnf || true
    return $changed
}

# ----------------------------------------------------------------------------- daemons
start_mariadb() {
    if mariadb-admin ping >/dev/null 2>&1; then
        return
    fi
    /etc/init.d/mariadb start >/dev/null
    touch "$STATE/mariadb"
    wait_for "MariaDB" mariadb-admin ping
}

create_database() {
    local pw
    pw=$(sed -n 's/^StoragePass=//p' "$ETC/slurmdbd.conf")
    mariadb -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

munge_ok() { munge -n | unmunge; }

start_munged() {
    munge_ok >/dev/null 2>&1 && return
    install -d -o munge -g munge -m 755 /run/munge
    runuser -u munge -- munged
    wait_for "munged" munge_ok
}

stop_slurm_daemons() {
    local pidfile
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid; do
        if alive "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid; do
        while alive "$pidfile"; do sleep 0.2; done
    done
}

register() {  # the cluster, an account and the calling user in the accounting database
    local user
    [ -n "$(sacctmgr -n -P show cluster "$CLUSTER" format=cluster)" ] || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    [ -n "$(sacctmgr -n -P show account newllm format=account)" ] \
        || sacctmgr -i add account newllm cluster="$CLUSTER" description=newllm organization=newllm >/dev/null
    for user in root ${SUDO_USER:-}; do
        [ -n "$(sacctmgr -n -P show assoc cluster="$CLUSTER" user="$user" format=user)" ] \
            || sacctmgr -i add user "$user" account=newllm cluster="$CLUSTER" >/dev/null
    done
}

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null; }

node_ready() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; }

start_slurm() {
    alive /run/slurmdbd.pid || slurmdbd
    wait_for "slurmdbd" sacctmgr -n show cluster
    register
    alive /run/slurmctld.pid || slurmctld
    wait_for "slurmctld" scontrol ping
    alive /run/slurmd.pid || slurmd
    wait_for "node $HOST" node_ready
}

main() {
    install_packages
    local t
    t=$(date +%s)
    if configure; then
        stop_slurm_daemons  # new settings: restart whatever runs with the old ones
    fi
    start_mariadb
    create_database
    start_munged
    start_slurm
    say "cluster $CLUSTER up: partition $PARTITION, node $HOST $(node_state) (started in $(elapsed "$t"), $(elapsed "$T0") in all)"
}

main "$@"
