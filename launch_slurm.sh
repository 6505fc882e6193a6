#!/usr/bin/env bash
# Runs `python -m kd.main ARGS --config.distributed=True` on every node of a Slurm allocation.
#
#   ./launch_slurm.sh --nodes=2 --gpus-per-node=8 --time=24:00:00 [--partition=P] [--account=A]
#       [--job-name=kd] [--python=.venv/bin/python] [--dry-run] \
#       -- --config=configs/llm/llama31_8b_to_1b.py --workdir=/shared/kd/llama
#
# Writes an sbatch script (one task per node, holding all of its GPUs) and submits it, or prints
# it with --dry-run. Each task runs kd.main under jax.distributed, which reads the coordinator,
# the process count and its own id from Slurm's environment. The workdir must be on a file system
# every node sees. Slurm sends SIGTERM 120 s before the time limit (and on preemption): kd then
# checkpoints the step in flight and exits with code 75, and the script requeues the job, whose
# next start resumes from that checkpoint.
set -euo pipefail

usage() { echo "Usage: launch_slurm.sh FLAGS [--] [kd.main args]"; sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "launch_slurm.sh: $*" >&2; echo "Try --help." >&2; exit 2; }

nodes='' gpus='' time_limit='' partition='' account='' job_name=kd python=.venv/bin/python dry=''
while (($#)); do
  arg=$1; shift
  case $arg in
    --) break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run|--dry_run) dry=1; continue ;;
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --*) key=$arg; (($#)) || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected argument '$arg' (kd.main arguments go after --)" ;;
  esac
  case $key in
    --nodes) nodes=$val ;; --gpus-per-node|--gpus_per_node) gpus=$val ;;
    --time) time_limit=$val ;; --partition) partition=$val ;; --account) account=$val ;;
    --job-name|--job_name) job_name=$val ;; --python) python=$val ;;
    *) die "unknown flag $key" ;;
  esac
done
main_args=("$@")

[[ -n $nodes ]] || die "missing required flag --nodes"
[[ -n $gpus ]] || die "missing required flag --gpus-per-node"
[[ -n $time_limit ]] || die "missing required flag --time (e.g. 24:00:00)"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ $gpus =~ ^[0-9]+$ ]] || die "--gpus-per-node must be an integer, got '$gpus'"
workdir=''
for a in "${main_args[@]}"; do [[ $a == --workdir=* ]] && workdir=${a#--workdir=}; done
[[ -n $workdir ]] || die "pass --workdir=DIR after -- (a directory every node sees)"
[[ $workdir != *[[:space:]]* ]] || die "the workdir '$workdir' holds a space, which #SBATCH lines cannot carry"
[[ " ${main_args[*]} " == *" --config.distributed="* ]] || main_args+=(--config.distributed=True)

repo=$(cd "$(dirname "$0")" && pwd)
quoted=$(printf ' %q' "$python" -m kd.main "${main_args[@]}")
script=$(cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --open-mode=append
#SBATCH --output=$workdir/slurm-%j.out
${partition:+#SBATCH --partition=$partition}
${account:+#SBATCH --account=$account}
# Written by launch_slurm.sh. Exit code 75: kd checkpointed on SIGTERM; run again to resume.
cd $(printf '%q' "$repo")
mkdir -p $(printf '%q' "$workdir")
rc=0
srun --kill-on-bad-exit=1$quoted || rc=\$?
if [[ \$rc -eq 75 ]]; then
  echo "kd: preempted; requeueing job \$SLURM_JOB_ID" >&2
  scontrol requeue "\$SLURM_JOB_ID"
fi
exit \$rc
EOF
)

if [[ -n $dry ]]; then
  printf '%s\n' "$script"
  exit 0
fi
mkdir -p "$workdir"  # Slurm opens the log file there before the script starts
file=$(mktemp "${TMPDIR:-/tmp}/kd_slurm.XXXXXX.sbatch")
printf '%s\n' "$script" > "$file"
echo "sbatch script: $file" >&2
sbatch "$file"
