# shellcheck shell=bash
# Sourced by the job scripts (from the repository root: sbatch runs them in the directory
# they were submitted from). Two helpers:
#
# wait_or_requeue PID: with `#SBATCH --signal=B:USR1@120`, SLURM sends SIGUSR1 to this batch
#   shell 120 s before the time limit. We pass SIGTERM on to the running step (srun forwards
#   it to every task: training writes checkpoint_last.pt, a bench sweep marks its run folder
#   interrupted) and put the job back in the queue. The requeued job keeps its job id, so a
#   run id made from it (slurm-<job id>) names the same run folder again, and
# resume_options COMMAND RUN_ID then finds it and continues it (see below).

# The trap is set when this file is sourced, before the step starts, so a signal that comes
# early is never lost; it signals the last background job ($!: the srun step), if any yet.
_requeue_now() {
    local step=$!
    echo "lungbench: time limit near: signalling step ${step:-(none yet)} and requeueing $SLURM_JOB_ID"
    if [ -n "$step" ]; then
        kill -TERM "$step" 2>/dev/null || true
        wait "$step" || true
    fi
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap _requeue_now USR1

wait_or_requeue() {
    wait "$1"
}

# resume_options COMMAND RUN_ID: set the array RESUME to the options that continue the run
# $LB_OUT/RUN_ID left by an earlier attempt of this job, or to nothing on the first attempt.
#   bench ...: --resume RUN_ID: the same run folder goes on, measuring only what it lacks.
#   train ...: --resume <the newest checkpoint_last.pt of RUN_ID, RUN_ID-2, ...>: training
#              continues exactly, in the next run folder (RUN_ID-2, RUN_ID-3, ...).
# Training resumes under DDP too (with the same number of tasks, as a requeued job has);
# a bench sweep resumes in one process only (lungbench refuses --resume under a launcher):
# a bench step of several tasks (SLURM_NTASKS > 1) starts a new run folder (RUN_ID-2, ...)
# instead of failing, and says so in the job's output.
resume_options() {
    local command=$1 run_id=$2 ckpt latest=""
    RESUME=()
    [ -e "$LB_OUT/$run_id" ] || return 0
    if [ "${SLURM_NTASKS:-1}" -gt 1 ] && [[ $command == bench* ]]; then
        echo "lungbench: $LB_OUT/$run_id is from an earlier attempt of this job; a bench" \
            "sweep resumes in one process only, so this ${SLURM_NTASKS}-task step starts a" \
            "new run folder next to it" >&2
        return 0
    fi
    case $command in
        bench*) RESUME=(--resume "$run_id") ;;
        train*)
            for ckpt in "$LB_OUT/$run_id/checkpoint_last.pt" "$LB_OUT/$run_id"-*/checkpoint_last.pt; do
                if [ -f "$ckpt" ] && { [ -z "$latest" ] || [ "$ckpt" -nt "$latest" ]; }; then
                    latest=$ckpt
                fi
            done
            if [ -n "$latest" ]; then RESUME=(--resume "$latest"); fi
            ;;
    esac
    if [ ${#RESUME[@]} -gt 0 ]; then echo "lungbench: resuming: ${RESUME[*]}" >&2; fi
    return 0
}
