#!/usr/bin/env bash
# Runs `python -m kd.main ARGS --config.distributed=True` on every worker of a Cloud TPU VM.
#
#   ./launch_tpu.sh --name=kd-v5e --zone=us-west4-a --accelerator=v5litepod-16 \
#       --version=v2-alpha-tpuv5-lite --bucket=gs://my-bucket/kd [--project=P] [--queued] [--spot] \
#       [--dry-run] -- --config=configs/shakespeare/distill.py --config.parallel.mode=mesh
#
# Creates the VM (or a queued resource with --queued) unless it exists, copies this checkout
# (HEAD plus uncommitted edits to tracked files, as a `git archive` tarball), installs kd and
# jax[tpu] in a venv on every worker, then starts the run detached, one log per worker in
# ~/kd_logs/. The workdir is --bucket/<name> unless the kd.main args carry --workdir=gs://...
# --dry-run prints every command, `+ `-prefixed and shell-quoted, and runs none. A run that
# checkpointed on SIGTERM (exit code 75) starts again on its own; after a spot VM is reclaimed,
# the same launch_tpu.sh command re-creates it and the run resumes from the workdir.
set -euo pipefail

usage() { echo "Usage: launch_tpu.sh FLAGS [--] [kd.main args]"; sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "launch_tpu.sh: $*" >&2; echo "Try --help." >&2; exit 2; }

name='' zone='' accelerator='' version='' project='' bucket='' queued='' spot='' dry=''
while (($#)); do
  arg=$1; shift
  case $arg in
    --) break ;;
    -h|--help) usage; exit 0 ;;
    --queued) queued=1; continue ;;
    --spot) spot=1; continue ;;
    --dry-run|--dry_run) dry=1; continue ;;
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --*) key=$arg; (($#)) || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected argument '$arg' (kd.main arguments go after --)" ;;
  esac
  case $key in
    --name) name=$val ;; --zone) zone=$val ;; --accelerator) accelerator=$val ;;
    --version) version=$val ;; --project) project=$val ;; --bucket) bucket=${val%/} ;;
    *) die "unknown flag $key" ;;
  esac
done
main_args=("$@")

for flag in name zone accelerator version; do
  [[ -n ${!flag} ]] || die "missing required flag --$flag"
done
workdir=''
for a in "${main_args[@]}"; do [[ $a == --workdir=* ]] && workdir=${a#--workdir=}; done
if [[ -z $workdir ]]; then
  [[ -n $bucket ]] || die "missing required flag --bucket (or pass --workdir=gs://... after --)"
  [[ $bucket == gs://* ]] || die "--bucket must start with gs:// (got '$bucket')"
  workdir=$bucket/$name
  main_args+=("--workdir=$workdir")
fi
[[ $workdir == gs://* ]] || die "the workdir must be on a bucket (gs://...), got '$workdir'"
[[ " ${main_args[*]} " == *" --config.distributed="* ]] || main_args+=(--config.distributed=True)

# Prints a command exactly as bash would read it back, then runs it (unless --dry-run).
run() { printf '+'; printf ' %q' "$@"; printf '\n'; [[ -n $dry ]] || "$@"; }

where=(--zone="$zone"); [[ -z $project ]] || where+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)

# 1. The VM: reuse it if it exists, else create it (directly, or through the queue).
if [[ -n $queued ]]; then
  qr=(gcloud compute tpus queued-resources)
  create=("${qr[@]}" create "$name" --node-id="$name" --accelerator-type="$accelerator"
          --runtime-version="$version" "${where[@]}")
  [[ -z $spot ]] || create+=(--spot)
  state=("${qr[@]}" describe "$name" "${where[@]}" --format='value(state.state)')
  if [[ -n $dry ]] || ! "${state[@]}" >/dev/null 2>&1; then run "${create[@]}"; fi
  run "${state[@]}"
  while [[ -z $dry ]]; do
    s=$("${state[@]}")
    [[ $s != ACTIVE ]] || break
    [[ $s != FAILED && $s != SUSPENDED ]] || die "queued resource $name is $s"
    echo "queued resource $name is $s; waiting..." >&2; sleep 60
  done
else
  create=("${tpu[@]}" create "$name" --accelerator-type="$accelerator" --version="$version"
          "${where[@]}")
  [[ -z $spot ]] || create+=(--spot)
  run "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' ||
    run "${create[@]}"
  # In a dry run describe prints and "succeeds": show the create command as well.
  [[ -z $dry ]] || run "${create[@]}"
fi

# 2. The code: HEAD plus uncommitted edits to tracked files (git stash create writes no ref).
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
tree=$(git -C "$root" stash create 2>/dev/null || true)
tarball=${TMPDIR:-/tmp}/kd-$name.tar.gz
run git -C "$root" archive --format=tar.gz -o "$tarball" "${tree:-HEAD}"
run "${tpu[@]}" scp "$tarball" "$name:kd.tar.gz" --worker=all "${where[@]}"

# 3. Install on every worker; the venv survives re-launches, the code is replaced.
install='rm -rf ~/kd && mkdir -p ~/kd ~/kd_logs && tar xzf ~/kd.tar.gz -C ~/kd'
install+=' && { test -d ~/kd_venv || python3 -m venv ~/kd_venv; }'
install+=' && ~/kd_venv/bin/pip install -q -U pip && cd ~/kd'
install+=" && ~/kd_venv/bin/pip install -q -e . 'jax[tpu]'"
run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command="$install"

# 4. Start detached on every worker; each writes its own log.
quoted=$(printf ' %q' "${main_args[@]}")
log="~/kd_logs/$name-\$(hostname).log"
# Exit code 75: kd checkpointed on SIGTERM (e.g. a maintenance event); start it again to resume.
job="until ~/kd_venv/bin/python -m kd.main$quoted; do [ \$? -eq 75 ] || break; done"
start="cd ~/kd && setsid nohup bash -c $(printf %q "$job") >> $log 2>&1 < /dev/null &"
run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command="$start"

[[ -z $dry ]] || exit 0
echo "started on $name, workdir $workdir; follow worker 0 with:" >&2
printf ' %q' "${tpu[@]}" ssh "$name" --worker=0 "${where[@]}" \
  --command="tail -f ~/kd_logs/$name-*.log" >&2
echo >&2
