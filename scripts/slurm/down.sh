#!/usr/bin/env bash
# Stop the single-node SLURM cluster that up.sh started from STATE_DIR: cancel its jobs, then stop exactly
# the recorded daemons (slurmd, slurmctld, munged), each only if its PID still belongs to the process
# that was started (same start time in /proc/PID/stat), with TERM, then KILL after 10 s.
#   bash scripts/slurm/down.sh /tmp/drgn-slurm
set -uo pipefail

STATE=${1:-/tmp/drgn-slurm}
log() { echo "slurm-down: $*" >&2; }

if [ ! -s "$STATE/pids" ]; then
    log "no recorded daemons in $STATE/pids; nothing to stop"
    exit 0
fi
export SLURM_CONF="$STATE/slurm.conf"

# Jobs first, while the controller still runs, so that no job step outlives the cluster.
if command -v scancel >/dev/null && squeue -h >/dev/null 2>&1; then
    scancel --full --cluster=drgnflow --user="$(id -un)" >/dev/null 2>&1 || true
    for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
fi

alive() {  # pid start: is this still the process we started?
    [ -r "/proc/$1/stat" ] && [ "$(awk '{print $22}' "/proc/$1/stat" 2>/dev/null)" = "$2" ]
}

# Reverse start order: slurmd, slurmctld, then munged (which the others need to shut down cleanly).
tac "$STATE/pids" | while read -r name pid start; do
    if ! alive "$pid" "$start"; then
        log "$name (pid $pid) already gone"
        continue
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do alive "$pid" "$start" || break; sleep 0.1; done
    if alive "$pid" "$start"; then
        log "$name (pid $pid) ignored TERM; sending KILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    log "stopped $name (pid $pid)"
done
rm -f "$STATE/pids"
# The links up.sh made at SLURM's default location, only where they point into this STATE_DIR.
for f in slurm.conf gres.conf; do
    if [ -L "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" = "$STATE/$f" ]; then
        rm -f "/etc/slurm/$f"
    fi
done
