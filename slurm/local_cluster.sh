#!/usr/bin/env bash
# A real, local SLURM cluster on this one machine (munge + slurmctld + slurmd), for developers
# and CI: it runs the repo's sbatch scripts exactly as a cluster would.
#
#   bash slurm/local_cluster.sh start     # install (if missing), configure, start, wait for idle
#   bash slurm/local_cluster.sh status    # exit 0 when all daemons run and every node is idle
#   bash slurm/local_cluster.sh stop      # stop the daemons this script started (by PID file)
#   bash slurm/local_cluster.sh env       # prints: export SLURM_CONF=...
#
# After start, point the clients at the cluster:   eval "$(bash slurm/local_cluster.sh env)"
#
# Environment:
#   SLURM_LOCAL_DIR    state directory (config, spool, logs, PID files)  [/tmp/slurm-local]
#   SLURM_LOCAL_NODES  number of slurmd "nodes" on this host: 1 (NodeName=<hostname>) or
#                      N>1 (NodeName=node[1-N], one slurmd each, distinct ports)         [1]
#   SLURM_LOCAL_PORT   slurmctld port; slurmd ports follow it                            [6817]
#   SLURM_LOCAL_TIMEOUT seconds to wait for the nodes to become idle                      [90]
#   SLURM_LOCAL_REQUEUE_DELAY  AuthInfo=cred_expire: seconds a requeued job waits before it can
#                      start again (SLURM's default is 120; shorter here for fast tests)  [15]
#   SLURM_LOCAL_NO_INSTALL=1  never call apt-get (fail instead)
#
# Needs root (daemons, apt-get). Daemons run in the background (no systemd needed); each is
# started in the foreground mode of its binary behind `setsid`, and its PID is written to
# $SLURM_LOCAL_DIR/run/*.pid. `stop` only ends processes named in those files.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
NODES="${SLURM_LOCAL_NODES:-1}"
PORT="${SLURM_LOCAL_PORT:-6817}"
WAIT_S="${SLURM_LOCAL_TIMEOUT:-90}"
CRED_EXPIRE="${SLURM_LOCAL_REQUEUE_DELAY:-15}"
CONF="$DIR/slurm.conf"
RUN="$DIR/run"
LOG="$DIR/log"
PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge)

export SLURM_CONF="$CONF"

log() { echo "[local_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# exit 3: SLURM is not installed and cannot be installed here (tests skip on this code only)
cannot_install() { log "CANNOT INSTALL: $*"; exit 3; }

# ---------------------------------------------------------------- process helpers
# alive PID: the process exists and is not a zombie (PID 1 here reaps slowly, so a dead
# daemon can linger as Z for a second or two and `kill -0` would still succeed).
alive() {
    local pid="$1" stat
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"           # drop "pid (comm) "; comm may contain spaces
    [[ "${stat:0:1}" != "Z" && "${stat:0:1}" != "X" ]]
}

pid_of() { [[ -s "$RUN/$1.pid" ]] && cat "$RUN/$1.pid" || true; }

# stop_one NAME: TERM the PID in run/NAME.pid, wait, then KILL if needed.
stop_one() {
    local name="$1" pid i
    pid="$(pid_of "$name")"
    if [[ -z "$pid" ]]; then return 0; fi
    if alive "$pid"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for i in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
        fi
    fi
    rm -f "$RUN/$name.pid"
}

node_names() {
    if [[ "$NODES" -le 1 ]]; then hostname -s; else
        local k; for k in $(seq 1 "$NODES"); do echo "node$k"; done
    fi
}

# ---------------------------------------------------------------- install
install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null || missing+=(slurm-client)
    [[ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/select_cons_tres.so || -n "$(ls /usr/lib/*/slurm-wlm/select_cons_tres.so 2>/dev/null)" ]] \
        || missing+=(slurm-wlm-basic-plugins)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ "${SLURM_LOCAL_NO_INSTALL:-0}" == 1 ]] && cannot_install "missing packages: ${missing[*]} (SLURM_LOCAL_NO_INSTALL=1)"
    [[ "$(id -u)" == 0 ]] || cannot_install "missing packages ${missing[*]} and not root: cannot apt-get install"
    command -v apt-get >/dev/null || cannot_install "missing packages ${missing[*]} and no apt-get"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq >"$LOG/apt.log" 2>&1 || { tail -30 "$LOG/apt.log" >&2; cannot_install "apt-get update failed"; }
    timeout 900 apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$LOG/apt.log" 2>&1 \
        || { tail -30 "$LOG/apt.log" >&2; cannot_install "apt-get install ${PACKAGES[*]} failed"; }
}

# ---------------------------------------------------------------- config
write_conf() {
    local host cpu_line mem k name cpus_etc
    host="$(hostname -s)"
    # `slurmd -C` -> "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    cpu_line="$(slurmd -C | head -n1)"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$cpu_line")"
    [[ -n "$mem" ]] || die "cannot parse 'slurmd -C': $cpu_line"
    mem=$(( mem * 9 / 10 ))     # a little below the real value, or the node turns INVAL
    cpus_etc="$(grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$cpu_line")"
    [[ -n "$cpus_etc" ]] || die "cannot parse 'slurmd -C': $cpu_line"

    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh - a local test cluster; regenerated on every start.
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${PORT}
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=${CRED_EXPIRE}
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=100000,batch_sched_delay=0,sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
JobRequeue=1
KillWait=15
InactiveLimit=0
MinJobAge=600
SlurmdTimeout=60
EOF
    if [[ "$NODES" -le 1 ]]; then
        echo "NodeName=${host} NodeAddr=127.0.0.1 ${cpus_etc} RealMemory=${mem} State=UNKNOWN" >>"$CONF"
    else
        for k in $(seq 1 "$NODES"); do
            name="node$k"
            echo "NodeName=${name} NodeHostname=${host} NodeAddr=127.0.0.1 Port=$((PORT + k)) ${cpus_etc} RealMemory=${mem} State=UNKNOWN" >>"$CONF"
        done
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >>"$CONF"
    # cgroup.conf is not used (proctrack/linuxproc, task/none) but some tools look for it.
    : >"$DIR/cgroup.conf"
}

# ---------------------------------------------------------------- daemons
munge_works() { timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        log "munged already answers on the default socket; reusing it"
        return 0
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            create-munge-key -f
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    log "starting munged"
    # -F: foreground, so the PID we record is munged itself (runuser execs when no PAM
    # session is requested... it may also fork; we record the real munged PID below).
    setsid runuser -u munge -- munged -F --force --log-file="$LOG/munged.log" \
        --pid-file=/run/munge/munged.pid </dev/null >>"$LOG/munged.out" 2>&1 &
    local i pid=""
    for i in $(seq 1 100); do
        if munge_works; then
            pid="$(cat /run/munge/munged.pid 2>/dev/null || true)"
            [[ -n "$pid" ]] && alive "$pid" && break
        fi
        sleep 0.1
    done
    munge_works || { cat "$LOG/munged.log" "$LOG/munged.out" >&2 2>/dev/null || true; die "munged did not start"; }
    echo "$pid" >"$RUN/munged.pid"
}

# start_daemon NAME CMD...: start in the background, detached, and record the PID.
start_daemon() {
    local name="$1"; shift
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
    local pid=$!
    echo "$pid" >"$RUN/$name.pid"
    sleep 0.3
    alive "$pid" || { tail -30 "$LOG/$name.out" >&2 || true; tail -30 "$LOG/$name.log" >&2 2>/dev/null || true; die "$name exited at start"; }
}

nodes_idle() {
    local states
    states="$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null)" || return 1
    [[ -n "$states" ]] || return 1
    # every node line must read idle (or mixed/allocated: busy with jobs is ready too)
    ! grep -qvE ' (idle|mixed|allocated|completing)$' <<<"$states"
}

daemons_alive() {
    local n
    alive "$(pid_of slurmctld)" || return 1
    for n in $(node_names); do alive "$(pid_of "slurmd.$n")" || return 1; done
    munge_works || return 1
}

cmd_start() {
    mkdir -p "$DIR" "$RUN" "$LOG" "$DIR/ctld"
    if [[ -s "$CONF" ]] && daemons_alive && nodes_idle; then
        log "already running (SLURM_CONF=$CONF)"
        return 0
    fi
    install_packages
    [[ "$(id -u)" == 0 ]] || cannot_install "must run as root to start munged/slurmctld/slurmd"
    # leftovers of an earlier, half-dead start: stop what our PID files name
    cmd_stop_quiet
    write_conf
    local n
    for n in $(node_names); do mkdir -p "$DIR/spool/$n"; done
    start_munge
    log "starting slurmctld (port $PORT)"
    # -c: clear previous job state (a test cluster starts empty); -i: ignore state errors
    start_daemon slurmctld slurmctld -D -c -i -f "$CONF"
    for n in $(node_names); do
        log "starting slurmd $n"
        if [[ "$NODES" -le 1 ]]; then
            start_daemon "slurmd.$n" slurmd -D -f "$CONF"
        else
            start_daemon "slurmd.$n" slurmd -D -f "$CONF" -N "$n"
        fi
    done
    local deadline=$(( SECONDS + WAIT_S ))
    until nodes_idle; do
        if (( SECONDS > deadline )); then
            log "nodes not idle after ${WAIT_S}s:"; timeout 10 sinfo -N -l >&2 || true
            tail -20 "$LOG/slurmctld.log" >&2 || true
            die "cluster did not become ready"
        fi
        daemons_alive || { tail -30 "$LOG"/*.log >&2 || true; die "a daemon died during start"; }
        # a node that came up DOWN (e.g. unexpected reboot) is resumed once
        timeout 10 scontrol update nodename=ALL state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    log "ready: $(timeout 10 sinfo -h -o '%P %D %T' | tr '\n' ' ')"
    log "use it with: export SLURM_CONF=$CONF"
}

cmd_stop_quiet() {
    local n f
    # slurmd(s) first, then slurmctld, then munged
    for f in "$RUN"/slurmd.*.pid; do
        [[ -e "$f" ]] || continue
        n="$(basename "$f" .pid)"
        [[ "$n" == *.daemon ]] && continue
        stop_one "$n"
    done
    stop_one slurmctld
    stop_one munged
}

cmd_stop() {
    if [[ ! -d "$RUN" ]]; then log "nothing to stop ($RUN missing)"; return 0; fi
    cmd_stop_quiet
    log "stopped"
}

cmd_status() {
    local rc=0 n
    for n in munged slurmctld $(for x in $(node_names); do echo "slurmd.$x"; done); do
        local pid; pid="$(pid_of "$n")"
        if alive "$pid"; then echo "$n: running (pid $pid)"; else echo "$n: not running"; rc=1; fi
    done
    if [[ $rc == 0 ]]; then
        timeout 10 sinfo -N -o '%N %P %T %C' || rc=1
        nodes_idle || rc=1
    fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
