# Shared launch mechanics for slurm/codistill.sbatch and slurm/baseline.sbatch (sourced, not run).
#
# The sbatch scripts set their tunables, build the trainer's argument list in TRAIN_ARGS and
# call `launch_trainer`. This file:
#   - launches one rank per GPU (or one per node when there are no GPUs) with `srun`, each
#     rank getting the torch env:// variables RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
#     (or, with LAUNCHER=deepspeed, runs DeepSpeed's launcher with a hostfile - needs ssh/pdsh
#     between nodes when the job has more than one);
#   - forwards SIGUSR1/SIGTERM that reach the batch shell to the ranks;
#   - when the trainer exits 75 (checkpoint saved after SIGUSR1/SIGTERM: "requeue me") it
#     requeues this job / array task, which then resumes with --resume auto.

slurm_log() { echo "[$(date '+%F %T')] [${SLURM_JOB_NAME:-job} ${REQUEUE_ID:-}] $*"; }

# The job id that `scontrol requeue` needs. For an array task this must be
# <array job id>_<task id>: SLURM_JOB_ID of the task that happens to carry the array's own id
# would requeue the WHOLE array.
if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    REQUEUE_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
    REQUEUE_ID="${SLURM_JOB_ID:-}"
fi

slurm_require() {  # slurm_require VAR "message": fail early with a clear message
    if [[ -z "${!1:-}" ]]; then slurm_log "ERROR: $2"; exit 2; fi
}

# Number of ranks per node: GPUS_PER_NODE if set (>0), else the allocation's GPUs per node,
# else 1 (CPU ranks, e.g. the local test cluster).
ranks_per_node() {
    local g="${GPUS_PER_NODE:-}"
    if [[ -z "$g" ]]; then
        g="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}"
        g="${g##*:}"                       # "a100:8" -> "8"
    fi
    [[ "$g" =~ ^[0-9]+$ ]] || g=0
    if (( g > 0 )); then echo "$g"; else echo 1; fi
}

launch_trainer() {
    local hosts nnodes per_node rc=0
    hosts=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
    nnodes=${#hosts[@]}
    per_node="$(ranks_per_node)"
    # Always set here: a MASTER_ADDR/MASTER_PORT inherited from the submitter's shell is wrong.
    # The first node's NodeAddr (what SLURM itself uses to reach it; normally its hostname).
    local addr
    addr="$(scontrol show node "${hosts[0]}" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2)"
    export MASTER_ADDR="${addr:-${hosts[0]}}"
    # A port of its own per array task / job, so that two groups (or two jobs) sharing a node
    # never collide; below Linux's ephemeral range (32768+).
    # (Each array task has a job id of its own.)
    export MASTER_PORT="$(( MASTER_PORT_BASE + ${SLURM_JOB_ID:-0} % 10000 ))"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    export PYTHONUNBUFFERED=1

    slurm_log "nodes: ${hosts[*]} | ranks: ${nnodes} x ${per_node} | MASTER ${MASTER_ADDR}:${MASTER_PORT} | launcher: ${LAUNCHER} | restart ${SLURM_RESTART_COUNT:-0}"
    slurm_log "command: ${PYTHON} recipes/train_lm.py ${TRAIN_ARGS[*]}"

    local pid
    case "$LAUNCHER" in
    srun)
        # One srun task per rank. srun (22.05) does not inherit --cpus-per-task from sbatch,
        # so pass it on explicitly.
        srun --nodes="$nnodes" --ntasks-per-node="$per_node" --ntasks="$(( nnodes * per_node ))" \
            ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
            --kill-on-bad-exit=1 ${SRUN_ARGS} \
            bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
                            LOCAL_WORLD_SIZE='"$per_node"'; exec "$@"' \
            rank "$PYTHON" recipes/train_lm.py "${TRAIN_ARGS[@]}" &
        pid=$!
        ;;
    deepspeed)
        # DeepSpeed's own launcher: one process on the batch host starts all ranks (pdsh/ssh
        # to the other nodes). Slurm's step signals cannot reach it: use --signal=B:USR1@120.
        local hostfile="${RUN_DIR}/hostfile.${SLURM_JOB_ID}" h
        mkdir -p "$RUN_DIR"
        : >"$hostfile"
        for h in "${hosts[@]}"; do echo "$h slots=$per_node" >>"$hostfile"; done
        local ds_args=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
        if (( nnodes > 1 )); then ds_args+=(--hostfile "$hostfile"); else ds_args+=(--num_gpus "$per_node"); fi
        # its own process group, so that a signal can be sent to the ranks it started here
        setsid deepspeed "${ds_args[@]}" recipes/train_lm.py "${TRAIN_ARGS[@]}" &
        pid=$!
        ;;
    *) slurm_log "ERROR: LAUNCHER must be srun or deepspeed, not '$LAUNCHER'"; exit 2 ;;
    esac

    # Signals that reach the batch shell (--signal=B:USR1@N, `scancel --batch --signal=USR1`)
    # are passed on to the ranks as SIGUSR1. (Not SIGTERM: srun turns SIGTERM into SIGKILL for
    # its tasks, and DeepSpeed's launcher kills its ranks on SIGTERM, so neither would leave the
    # trainer time to checkpoint.) Signals sent to the job steps - the default of --signal and
    # of `scancel --signal` - reach the ranks directly. Each rank finishes its step, saves a
    # checkpoint and exits 75.
    GOT_SIGNAL=""
    _forward() {
        GOT_SIGNAL=1
        slurm_log "batch shell got SIG$1: sending SIGUSR1 to the ranks"
        if [[ "$LAUNCHER" == srun ]]; then
            kill -USR1 "$pid" 2>/dev/null || true          # srun forwards SIGUSR1 to every task
        else
            local p
            for p in $(ps -o pid= -s "$pid" 2>/dev/null); do  # the ranks in the launcher's session
                [[ "$p" != "$pid" ]] && grep -qa 'recipes/train_lm.py' "/proc/$p/cmdline" 2>/dev/null \
                    && ! grep -qa 'deepspeed.launcher\|bin/deepspeed' "/proc/$p/cmdline" 2>/dev/null \
                    && kill -USR1 "$p" 2>/dev/null
            done
        fi
    }
    trap '_forward USR1' USR1
    trap '_forward TERM' TERM
    # `wait` returns early (status > 128) when a trapped signal arrives: then wait again.
    while :; do
        rc=0; wait "$pid" || rc=$?
        if (( rc > 128 )) && [[ -n "$GOT_SIGNAL" ]]; then GOT_SIGNAL=""; continue; fi
        break
    done
    trap - USR1 TERM

    if (( rc == 75 )); then
        if (( ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES )); then
            slurm_log "trainer checkpointed and asked to be requeued, but this job was already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=${MAX_REQUEUES}); not requeueing"
            exit 75
        fi
        slurm_log "trainer saved a checkpoint and exited 75: requeueing ${REQUEUE_ID} (resumes with --resume auto)"
        if scontrol requeue "$REQUEUE_ID"; then
            # SLURM now ends this run of the job; it starts again from the queue.
            sleep 60
            exit 0
        fi
        slurm_log "ERROR: scontrol requeue ${REQUEUE_ID} failed; resubmit by hand to resume"
        exit 75
    fi
    slurm_log "trainer exited with code $rc"
    return "$rc"
}
