#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on this machine, for testing profiles/slurm for real.
#
#   scripts/slurm_local.sh up       install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   scripts/slurm_local.sh down     stop what `up` started, remove what it wrote
#   scripts/slurm_local.sh status   say whether the cluster is up
#
# Needs root (Debian 12: slurm-wlm 22.05). Idempotent: `up` on a running cluster and `down` on a
# stopped one do nothing. It touches only what it created: its state lives in $STATE (config
# copy, spool, logs, pid files, a list of what it started), /etc/slurm/slurm.conf is written
# only when absent and carries a marker line, and munged is stopped on `down` only if `up`
# started it. It refuses to run over a slurm.conf it did not write. Installed Debian packages
# stay installed (their services are kept from starting during the install).
#
# The node: this host, every CPU, RealMemory from `slurmd -C` less 5 %, one default partition
# `debug` and a second one `alt` (to test choosing a partition), no accounting
# (accounting_storage/none), no cgroups (proctrack/linuxproc, task/none),
# so nothing is enforced but scheduling: a job asking for more memory than the node has is
# refused at submission, as on a real site.
set -euo pipefail

STATE=${CONVQA_SLURM_STATE:-/var/lib/convqa-slurm-local}
CONF=/etc/slurm/slurm.conf
MARKER="# written by convqa scripts/slurm_local.sh; removed by 'scripts/slurm_local.sh down'"
PACKAGES=(slurmctld slurmd slurm-client munge)
UP_TIMEOUT=${CONVQA_SLURM_UP_TIMEOUT:-60}

log() { echo "slurm_local: $*" >&2; }
die() { log "$*"; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

ours() { [ -f "$CONF" ] && head -n 1 "$CONF" | grep -qxF "$MARKER"; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${PACKAGES[*]}"
    # Keep the packages' services from starting on install (Debian's policy-rc.d protocol): this
    # script starts the daemons itself, and `down` must leave none running.
    local policy=/usr/sbin/policy-rc.d added_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    [ -n "$added_policy" ] && rm -f "$policy"
    return 0
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a working munged (ours from an earlier `up`, or the site's): leave it be
    fi
    [ -s /etc/munge/munge.key ] || { log "creating /etc/munge/munge.key"; mungekey --create --keyfile=/etc/munge/munge.key; echo munge.key >>"$STATE/created"; }
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge; chmod 0600 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid
    echo munged >>"$STATE/started"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not come up"
}

write_conf() {
    local host node_line mem cpus
    host=$(hostname -s)
    node_line=$(slurmd -C | head -n 1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    mem=$((mem * 95 / 100))
    install -d -o slurm -g slurm "$STATE/ctld" "$STATE/log"
    install -d "$STATE/d"
    cat >"$STATE/slurm.conf" <<EOF
$MARKER
ClusterName=convqa-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
# Finished jobs stay visible to squeue/scontrol for an hour: the plugin's squeue status check
# and tests/test_slurm.py read them back.
MinJobAge=3600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=alt Nodes=$host Default=NO MaxTime=INFINITE State=UP
EOF
    install -d /etc/slurm
    cp "$STATE/slurm.conf" "$CONF"
}

wait_idle() {
    local state=
    for _ in $(seq $((UP_TIMEOUT * 2))); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
        case "$state" in
            idle|mixed|allocated|completing) return 0 ;;
            down*|drain*) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node not idle after ${UP_TIMEOUT}s (state '${state}'); see $STATE/log/"
}

up() {
    need_root
    if [ -f "$CONF" ] && ! ours; then
        if sinfo -h >/dev/null 2>&1; then log "a SLURM cluster not started by this script is reachable; leaving it alone"; exit 0; fi
        die "$CONF exists and was not written by this script; refusing to touch it"
    fi
    if ours && alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"; then
        wait_idle; log "already up"; sinfo; return
    fi
    install_packages
    install -d "$STATE"; touch "$STATE/started" "$STATE/created"
    [ -f "$STATE/slurm.conf" ] && ours || write_conf
    start_munge
    alive "$STATE/slurmctld.pid" || { slurmctld; echo slurmctld >>"$STATE/started"; }
    for _ in $(seq 40); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.25; done
    alive "$STATE/slurmd.pid" || { slurmd; echo slurmd >>"$STATE/started"; }
    wait_idle
    srun -N1 -n1 -t 1 true || die "srun failed; see $STATE/log/"
    log "up"; sinfo
}

stop_pidfile() {
    local pidfile=$1 name=$2 pid
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    log "$name ($pid) did not stop on TERM; killing"; kill -9 "$pid" 2>/dev/null || true
}

down() {
    need_root
    [ -d "$STATE" ] || { ours && rm -f "$CONF"; log "not up"; return 0; }
    if ours; then
        # Jobs first (their slurmstepd children), then the daemons this script started.
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    stop_pidfile "$STATE/slurmd.pid" slurmd
    # slurmstepd processes orphaned by a job that did not stop in time (ours: this node's
    # slurmd was ours, and no other slurmd can share its port).
    ours && pkill_steps
    stop_pidfile "$STATE/slurmctld.pid" slurmctld
    if grep -qx munged "$STATE/started" 2>/dev/null; then stop_pidfile /run/munge/munged.pid munged; fi
    if grep -qx munge.key "$STATE/created" 2>/dev/null; then rm -f /etc/munge/munge.key; fi
    ours && rm -f "$CONF"
    rm -rf "$STATE"
    log "down"
}

pkill_steps() {
    local pid
    for pid in $(pgrep -f '^slurmstepd' 2>/dev/null || true); do
        kill "$pid" 2>/dev/null || true
    done
}

status() {
    if ours && alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"; then
        log "up (state in $STATE)"; sinfo; return 0
    fi
    if sinfo -h >/dev/null 2>&1; then log "a SLURM cluster not started by this script is reachable"; sinfo; return 0; fi
    log "not up"; return 3
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
