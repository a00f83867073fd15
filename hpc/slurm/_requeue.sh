# Sourced by the job scripts. With `#SBATCH --signal=B:USR1@120`, SLURM sends SIGUSR1 to this
# batch shell 120 s before the time limit. We pass SIGTERM on to the running step (srun
# forwards it to every task: training writes a checkpoint, a bench sweep marks its run folder
# interrupted) and put the job back in the queue; the requeued job resumes where it stopped.

wait_or_requeue() {
    local pid=$1
    trap 'echo "lungbench: time limit near: signalling step $pid and requeueing $SLURM_JOB_ID";
          kill -TERM "$pid" 2>/dev/null || true; wait "$pid" || true;
          scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
    wait "$pid"
}
