# shellcheck shell=bash
# Shared launch logic for slurm/train.sbatch, slurm/compare.sbatch and slurm/cv.sbatch. Sourced, not run.
#
# Site settings (environment variables, all optional; `sbatch` exports your environment):
#   GASTRO_DIST_VENV=/path/to/venv    activate this virtualenv in the job (else edit gd_site_setup)
#   GASTRO_DIST_HOME=/path/to/repo    where slurm/ lives (default: found from the submitted script)
#   GASTRO_DIST_PROCS_PER_NODE=N      processes per node (default: GPUs per node, 1 when none)
#   GASTRO_DIST_MASTER_ADDR=ADDR      rendezvous address (default: first node's name or NodeAddr)
#   GASTRO_DIST_PORT=PORT             rendezvous port (default: 20000 + job id % 12000)
#   GASTRO_DIST_LAUNCH_ARGS="..."     extra `accelerate launch` flags, e.g. "--max_restarts 0" (precision: the run config)
#   GASTRO_DIST_ACCELERATE_CONFIG=F   an accelerate config file, e.g. launch/deepspeed_zero2.yaml (DeepSpeed ZeRO-2)
#   GASTRO_DIST_SRUN_ARGS="..."       extra `srun` flags, e.g. "--label"
#   GASTRO_DIST_MAX_RESTARTS=N        stop requeueing after N restarts (default 50)
#   WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY / WANDB_API_KEY   passed through, never printed

GD_PREEMPT_EXIT=75          # the trainer's "checkpoint saved, please requeue me" status (EX_TEMPFAIL)

gd_log() { printf '[gastro-dist %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# ---------------------------------------------------------------- site setup (EDIT HERE)
gd_site_setup() {
    # Put your cluster's environment set-up here, or set GASTRO_DIST_VENV before sbatch.
    # (nounset is off in here: module and conda scripts often read unset variables.)
    set +u
    # Examples:
    #   module load python/3.11 cuda/12.4
    #   source "$HOME/miniconda3/etc/profile.d/conda.sh" && conda activate gastro-dist
    gd_site_setup_env
    local rc=$?
    set -u
    return $rc
}

gd_site_setup_env() {
    if [ -n "${GASTRO_DIST_VENV:-}" ]; then
        if [ ! -f "$GASTRO_DIST_VENV/bin/activate" ]; then
            gd_log "ERROR: GASTRO_DIST_VENV=$GASTRO_DIST_VENV has no bin/activate"
            return 1
        fi
        # shellcheck disable=SC1091
        source "$GASTRO_DIST_VENV/bin/activate"
    fi
    if ! command -v accelerate >/dev/null 2>&1; then
        gd_log "ERROR: 'accelerate' not on PATH: set GASTRO_DIST_VENV=/path/to/venv or edit gd_site_setup in slurm/_common.sh"
        return 1
    fi
    # Not pip-installed? Then run from the source tree.
    if ! python -c 'import gastro_dist' >/dev/null 2>&1; then
        export PYTHONPATH="$GASTRO_DIST_HOME${PYTHONPATH:+:$PYTHONPATH}"
        if ! python -c 'import gastro_dist' >/dev/null 2>&1; then
            gd_log "ERROR: cannot import gastro_dist (not installed in $(command -v python), not in $GASTRO_DIST_HOME)"
            return 1
        fi
    fi
}

# ---------------------------------------------------------------- discovery
# Number of GPUs on this node (the batch shell runs on the first node; nodes are assumed alike).
gd_gpus_per_node() {
    local n=""
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
        n=$SLURM_GPUS_ON_NODE
    elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        # Set means "these GPUs": empty (or SLURM's NoDevFiles, or -1) means none.
        case "$CUDA_VISIBLE_DEVICES" in
            ""|NoDevFiles|-1) n=0 ;;
            *) n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES") ;;
        esac
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    echo "${n:-0}"
}

# Rendezvous address: first node of the allocation, by name if it resolves, else its NodeAddr.
gd_master_addr() {
    if [ -n "${GASTRO_DIST_MASTER_ADDR:-}" ]; then echo "$GASTRO_DIST_MASTER_ADDR"; return; fi
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    if getent hosts "$first" >/dev/null 2>&1; then
        echo "$first"
        return
    fi
    addr=$(scontrol show node "$first" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n1)
    echo "${addr:-$first}"
}

# Is a TCP port free for listening on this host? (python is there once the env is set up)
gd_port_free() {
    python - "$1" <<'PY' >/dev/null 2>&1
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1]))); s.close()
PY
}

gd_master_port() {
    if [ -n "${GASTRO_DIST_PORT:-}" ]; then echo "$GASTRO_DIST_PORT"; return; fi
    # 20000-31999 stays below Linux's ephemeral range (32768-60999 by default), where srun,
    # slurmstepd and gloo bind random listening ports: a port there can be free when checked
    # below and taken a moment later, before rank 0's launcher claims it.
    local port=$((20000 + SLURM_JOB_ID % 12000)) tries=0
    # The batch shell runs on the first node, which hosts the rendezvous: skip ports in use there.
    if [ "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" = "${SLURMD_NODENAME:-}" ]; then
        while ! gd_port_free "$port" && [ $tries -lt 50 ]; do
            port=$((20000 + (port - 20000 + 1) % 12000)); tries=$((tries + 1))
        done
    fi
    echo "$port"
}

# Value of --out in a trainer argument list (absolute path), or empty.
gd_find_out() {
    local prev="" a out=""
    for a in "$@"; do
        case "$a" in
            --out=*) out="${a#--out=}" ;;
            *) [ "$prev" = "--out" ] && out="$a" ;;
        esac
        prev="$a"
    done
    [ -n "$out" ] && realpath -m "$out"
}

# status field of RUN/summary.json if the file was written at/after epoch $2, else empty.
gd_summary_status_since() {
    local summary="$1/summary.json" since="$2"
    [ -f "$summary" ] || return 0
    [ "$(stat -c %Y "$summary")" -ge "$since" ] || return 0
    python -c 'import json,sys; print(json.load(open(sys.argv[1])).get("status",""))' "$summary" 2>/dev/null || true
}

# ---------------------------------------------------------------- per-node task (runs under srun)
# Usage (internal): bash _common.sh --node-task NNODES TOTAL_PROCS MASTER PORT THREADS -- TRAINER-ARGS...
gd_node_task() {
    local nnodes=$1 total=$2 master=$3 port=$4 threads=$5
    shift 6
    local rank=${SLURM_NODEID:?not inside srun} started rc status run
    started=$(date +%s)
    local -a launch=(accelerate launch --num_machines "$nnodes" --num_processes "$total"
                     --machine_rank "$rank" --main_process_ip "$master" --main_process_port "$port"
                     --num_cpu_threads_per_process "$threads" --dynamo_backend no)
    # An accelerate config file (e.g. launch/deepspeed_zero2.yaml) picks the distributed mode itself.
    # Otherwise, more than one process in total: torchrun via --multi_gpu (also the way to get several
    # CPU processes; the trainer then uses Accelerator(cpu=True) -> gloo). One: plain launch.
    if [ -n "${GASTRO_DIST_ACCELERATE_CONFIG:-}" ]; then
        launch+=(--config_file "$GASTRO_DIST_ACCELERATE_CONFIG")
    elif [ "$total" -gt 1 ]; then
        launch+=(--multi_gpu)
    fi
    # shellcheck disable=SC2206
    [ -n "${GASTRO_DIST_LAUNCH_ARGS:-}" ] && launch+=($GASTRO_DIST_LAUNCH_ARGS)
    launch+=(-m gastro_dist train "$@")
    gd_log "node rank $rank/$nnodes on $(hostname) (${SLURMD_NODENAME:-?}): ${launch[*]}"
    if [ "$rank" -gt 0 ]; then
        # Node 0 opens the rendezvous port first. Where nodes share a host (the one-machine test cluster),
        # torchrun on a later node would otherwise take the port as its own store before node 0's launcher
        # checks it, and node 0 then stops with "port in use". Elsewhere this waits a few seconds at most.
        local waited=0
        until (exec 3<>"/dev/tcp/$master/$port") 2>/dev/null || [ "$waited" -ge 120 ]; do
            sleep 1; waited=$((waited + 1))
        done
    fi
    "${launch[@]}"
    rc=$?
    # A preemption: the trainer exits 75 after saving, but accelerate launch/torchrun turn that
    # into 1, so recognise it by summary.json saying "preempted" (written during this run).
    if [ "$rc" -ne 0 ]; then
        run=$(gd_find_out "$@")
        status=""
        if [ -n "$run" ]; then
            status=$(gd_summary_status_since "$run" "$started")
            # Ranks on other nodes can get here before the main process (node 0) has written
            # summary.json: give it a few seconds when a preemption was requested.
            local waited=0
            while [ "$status" != "preempted" ] && [ -e "$run/.preempt_requested" ] && [ $waited -lt 10 ]; do
                sleep 1; waited=$((waited + 1))
                status=$(gd_summary_status_since "$run" "$started")
            done
        fi
        if [ "$status" = "preempted" ] || [ "$rc" -eq "$GD_PREEMPT_EXIT" ]; then
            # Report a clean stop as 0: a non-zero status would make srun --kill-on-bad-exit
            # terminate the other nodes' tasks, possibly while the main process still finishes
            # its last writes (summary, W&B). The batch script decides on requeueing from
            # summary.json. Real failures keep their status and still end the whole step.
            gd_log "node rank $rank: trainer saved a checkpoint and stopped (preempted, launcher status $rc)"
            rc=0
        fi
    fi
    gd_log "node rank $rank: exit $rc"
    return "$rc"
}

# ---------------------------------------------------------------- batch-shell side
GD_PREEMPT=0
GD_CANCELLED=0
GD_GOT_SIGNAL=0

gd_on_usr1() {
    GD_GOT_SIGNAL=1
    GD_PREEMPT=1
    gd_log "SIGUSR1: asking the trainer to checkpoint and stop (touch ${GD_RUN:-?}/.preempt_requested)"
    [ -n "${GD_RUN:-}" ] && mkdir -p "$GD_RUN" && touch "$GD_RUN/.preempt_requested"
}

gd_on_term() {
    GD_GOT_SIGNAL=1
    GD_CANCELLED=1
    gd_log "SIGTERM: job cancelled/ending; waiting for the step, will NOT requeue"
}

# Launch the trainer on all nodes of the allocation and handle preemption.
# Usage: gd_run_training TRAINER-ARGS...   (the args of `gastro-dist train`)
# Returns the status the batch script should exit with (0 after a successful requeue).
gd_run_training() {
    local nnodes=${SLURM_NNODES:-1} gpus procs total master port cpus threads started rc w status
    GD_RUN=$(gd_find_out "$@")
    if [ -z "$GD_RUN" ]; then
        gd_log "ERROR: no --out RUN among the trainer arguments: $*"
        return 2
    fi
    gpus=$(gd_gpus_per_node)
    procs=${GASTRO_DIST_PROCS_PER_NODE:-$gpus}
    [ "$procs" -ge 1 ] 2>/dev/null || procs=1
    total=$((nnodes * procs))
    master=$(gd_master_addr)
    port=$(gd_master_port)
    cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
    threads=$((cpus / procs)); [ "$threads" -ge 1 ] || threads=1
    if [ "$gpus" -eq 0 ]; then export ACCELERATE_USE_CPU=1; fi

    gd_log "job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})} restart ${SLURM_RESTART_COUNT:-0} | $nnodes node(s) ${SLURM_JOB_NODELIST} | master $master:$port | $procs proc/node x $nnodes = $total process$([ "$total" -gt 1 ] && echo es) ($([ "$gpus" -gt 0 ] && echo "$gpus GPU/node" || echo CPU), $threads threads/proc)"
    gd_log "run dir $GD_RUN | python $(command -v python) | W&B mode=${WANDB_MODE:-default} project=${WANDB_PROJECT:--} entity=${WANDB_ENTITY:--} key=$([ -n "${WANDB_API_KEY:-}" ] && echo set || echo unset)"

    # Mistakes in the config, shards, weights or run folder end the job here: one line, exit 2, no requeue.
    # A requeued job runs the command that passed at its first start, so its restarts skip this.
    if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ] && ! python -m gastro_dist train --check --processes "$total" "$@"; then
        gd_log "the check above failed: not starting the run (fix it and submit again)"
        return 2
    fi
    mkdir -p "$GD_RUN"
    trap gd_on_usr1 USR1
    trap gd_on_term TERM
    started=$(date +%s)

    # srun in the background + wait, so that the USR1 trap runs while we wait.
    # shellcheck disable=SC2086
    # (--cpus-per-task is given explicitly: srun 22.05 does not inherit it from sbatch.)
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes="$nnodes" --ntasks="$nnodes" \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} ${GASTRO_DIST_SRUN_ARGS:-} \
        bash "$GD_COMMON" --node-task "$nnodes" "$total" "$master" "$port" "$threads" -- "$@" &
    local srun_pid=$!
    rc=0
    while :; do
        GD_GOT_SIGNAL=0
        wait "$srun_pid"; w=$?
        [ "$w" -eq 127 ] && break                                   # already collected
        rc=$w
        if [ "$GD_GOT_SIGNAL" = 1 ] && [ "$w" -gt 128 ]; then continue; fi   # a trap interrupted wait
        break
    done
    trap - USR1 TERM

    status=$(gd_summary_status_since "$GD_RUN" "$started")
    gd_log "training step finished: status $rc, summary status '${status:-none}'"
    if [ "$GD_CANCELLED" = 1 ]; then
        gd_log "cancelled: not requeueing (re-submit the same command to resume from the last checkpoint)"
        return "$rc"
    fi
    # Preempted: the trainer wrote status "preempted" during this run (the node tasks report a
    # clean stop as 0; 75 would come from a launcher that passes the trainer's status through).
    if [ "$rc" -eq "$GD_PREEMPT_EXIT" ] || [ "$status" = "preempted" ]; then
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "${GASTRO_DIST_MAX_RESTARTS:-50}" ]; then
            gd_log "preempted, but already restarted ${SLURM_RESTART_COUNT} times (GASTRO_DIST_MAX_RESTARTS): not requeueing"
            return "$GD_PREEMPT_EXIT"
        fi
        gd_log "checkpoint saved after preemption request: scontrol requeue $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            return 0
        fi
        gd_log "ERROR: scontrol requeue failed; re-submit the same command to resume"
        return "$GD_PREEMPT_EXIT"
    fi
    if [ "$GD_PREEMPT" = 1 ] && [ "$rc" -eq 0 ]; then
        gd_log "preemption was requested but training had already finished"
    fi
    return "$rc"
}

# Run as a program under srun: the per-node task.
if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = "--node-task" ]; then
    shift
    gd_node_task "$@"
    exit $?
fi
