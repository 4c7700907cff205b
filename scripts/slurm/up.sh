#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this machine (localhost), for the workflow's SLURM integration
# test and for trying the SLURM profile without a real cluster. Needs root on Debian/Ubuntu.
#
#   source <(bash scripts/slurm/up.sh /tmp/drgn-slurm)   # prints `export SLURM_CONF=...`
#   snakemake --profile profiles/slurm ...
#   bash scripts/slurm/down.sh /tmp/drgn-slurm
#
# What it does:
#  - installs Debian's slurm-wlm and munge if absent, behind a deny-all policy-rc.d so that the packages'
#    maintainer scripts start no service behind our back;
#  - writes slurm.conf and gres.conf into STATE_DIR: partitions `cpu` (default) and `gpu`, one node with
#    one fake GPU (File=/dev/null: jobs asking for --gpus=1 schedule and see CUDA_VISIBLE_DEVICES=0, but
#    torch finds no device and runs on the CPU). SLURM_CONF points every command at it, and symbolic
#    links at SLURM's default location (/etc/slurm/slurm.conf, gres.conf) serve the `srun` inside each job,
#    whose environment the Snakemake job-step plugin strips of SLURM_* variables. An existing
#    /etc/slurm/slurm.conf that is not such a link is never replaced (up.sh stops instead); down.sh
#    removes only links into its own STATE_DIR;
#  - starts munged, slurmctld and slurmd in the foreground, in the background of this script, and records
#    each PID with its start time (field 22 of /proc/PID/stat) in STATE_DIR/pids, so that down.sh stops
#    exactly these processes and never another one that reused a PID.
# Accounting is off (no slurmdbd): the profile polls job states with squeue, and MinJobAge keeps finished
# jobs visible to squeue (and to the test that checks where each job ran) for 2 hours.
# Exit status: 0 when the node is idle and accepting jobs; 3 when the packages cannot be installed
# (tests skip on that); 1 on any other failure (daemons already started are stopped again).
set -euo pipefail

STATE=${1:-/tmp/drgn-slurm}
STATE=$(mkdir -p "$STATE" && cd "$STATE" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)

log() { echo "slurm-up: $*" >&2; }

# ---- packages -------------------------------------------------------------------------------------
install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "slurm-wlm and munge are not installed and cannot be installed here (needs root and apt-get)"
        return 3
    fi
    local created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# written by drgnflow scripts/slurm/up.sh: start no service during installs\nexit 101\n' \
            > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    log "installing slurm-wlm and munge"
    local ok=0
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q --no-install-recommends slurm-wlm munge >"$STATE/apt.log" 2>&1; then
        ok=1
    elif apt-get update -q >>"$STATE/apt.log" 2>&1 &&
        apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$STATE/apt.log" 2>&1; then
        ok=1
    fi
    if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    if [ "$ok" != 1 ]; then
        log "could not install slurm-wlm and munge (see $STATE/apt.log)"
        return 3
    fi
}

rc=0
install_packages || rc=$?
if [ "$rc" != 0 ]; then exit "$rc"; fi

if [ -s "$STATE/pids" ]; then
    log "$STATE/pids exists: a cluster from this folder may still be running; run down.sh $STATE first"
    exit 1
fi

# ---- munge: a key readable only by the munge user, and its socket folder ---------------------------
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge

# ---- configuration -----------------------------------------------------------------------------------
mkdir -p "$STATE/spool/ctld" "$STATE/spool/d" "$STATE/log"
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc alone follows OMP_NUM_THREADS
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat > "$STATE/slurm.conf" <<CONF
# Single-node test cluster written by drgnflow scripts/slurm/up.sh
ClusterName=drgnflow
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Without a default, a job that gives no --mem takes the whole node and blocks every other job.
DefMemPerCPU=1000
GresTypes=gpu
# Finished jobs stay visible to squeue (the profile's status command) for 10 minutes.
MinJobAge=7200
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SchedulerParameters=sched_interval=2
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
CONF
cat > "$STATE/gres.conf" <<CONF
# Fake GPU of the single-node test cluster written by drgnflow scripts/slurm/up.sh
AutoDetect=off
NodeName=localhost Name=gpu Count=1 File=/dev/null
CONF
export SLURM_CONF="$STATE/slurm.conf"

# SLURM's default configuration path, for job steps that do not see SLURM_CONF. A link left by an earlier
# test cluster (dangling, or into a folder whose cluster is down) is replaced; anything else is refused.
mkdir -p /etc/slurm
for f in slurm.conf gres.conf; do
    target=/etc/slurm/$f
    if [ -L "$target" ] && [ ! -e "$target" ]; then
        rm -f "$target"
    elif [ -e "$target" ] && [ "$(readlink "$target")" != "$STATE/$f" ]; then
        other=$(dirname "$(readlink "$target" || true)")
        if ! [ -L "$target" ] || ! head -1 "$target" | grep -q "drgnflow scripts/slurm/up.sh"; then
            log "$target exists and is not ours; refusing to replace a real SLURM configuration"
            exit 1
        elif [ -s "$other/pids" ]; then
            log "another test cluster is up (from $other); stop it with down.sh $other first"
            exit 1
        fi
    fi
    ln -sfn "$STATE/$f" "$target"
done

# ---- daemons: foreground processes in our background, each PID recorded with its start time ----------
: > "$STATE/pids"
record() {  # name pid
    local start
    start=$(awk '{print $22}' "/proc/$2/stat")
    echo "$1 $2 $start" >> "$STATE/pids"
}
fail() {
    log "$1; stopping what was started (logs in $STATE/log)"
    bash "$HERE/down.sh" "$STATE" >&2 || true
    exit 1
}

setpriv --reuid=munge --regid=munge --init-groups munged -F >"$STATE/log/munged.out" 2>&1 &
record munged $!
for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || fail "munged does not answer"

slurmctld -D -c -f "$SLURM_CONF" >"$STATE/log/slurmctld.out" 2>&1 &
record slurmctld $!
slurmd -D -N localhost -f "$SLURM_CONF" >"$STATE/log/slurmd.out" 2>&1 &
record slurmd $!

for _ in $(seq 150); do
    state=$(sinfo -h -N -n localhost -o %t 2>/dev/null | head -1 || true)
    if [ "$state" = idle ]; then
        log "node localhost idle ($CPUS CPUs, ${MEM_MB} MB, 1 fake GPU); SLURM_CONF=$SLURM_CONF"
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    for name in munged slurmctld slurmd; do
        pid=$(awk -v n="$name" '$1 == n {print $2}' "$STATE/pids")
        kill -0 "$pid" 2>/dev/null || fail "$name exited"
    done
    sleep 0.2
done
fail "the node did not become idle within 30 s (state: ${state:-none})"
