#!/usr/bin/env bash
# Cloud TPU VM helper for kava-jax: one slice (single- or multi-host), every command on all workers.
# See launch/README.md for the walk-through. `--dry-run` prints the exact commands instead of running.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND [options] [-- ARGS...]

commands
  create    request the slice (queued resource by default; --no-queued: tpu-vm create)
  status    describe the slice (or its queued resource)
  push      copy this checkout (git archive of HEAD + uncommitted tracked changes) to every worker
  setup     create the virtualenv on every worker and `pip install -e .[tpu]` the pushed checkout
  run       start `kava-train ARGS --config.distributed=True` in tmux on every worker, env.sh sourced;
            ARGS must hold --config=... and --workdir=gs://...; the same command again resumes from
            the workdir's last checkpoint (nothing here ever deletes a workdir)
  logs      tail worker 0's job log (~/kava-logs/latest.log)
  ssh       run ARGS as a shell command on the workers (e.g. to download weights)
  stop      SIGTERM the running job on every worker (it checkpoints and exits), then close tmux
  delete    delete the slice (and its queued resource)

options (environment variable in brackets)
  --name NAME            slice name                       [KAVA_TPU_NAME]       required
  --zone ZONE            e.g. us-west4-a                  [KAVA_TPU_ZONE]       required
  --project PROJECT      default: gcloud's configuration  [KAVA_TPU_PROJECT]
  --type TYPE            accelerator type                 [KAVA_TPU_TYPE]       v5litepod-8
  --runtime VERSION      TPU VM runtime version           [KAVA_TPU_RUNTIME]    v2-alpha-tpuv5-lite
  --spot                 spot capacity (create)           [KAVA_TPU_SPOT=1]
  --no-queued            create/delete the VM directly instead of via a queued resource
  --remote-dir DIR       checkout on the workers          [KAVA_TPU_REMOTE_DIR] ~/kava-jax
  --venv DIR             virtualenv on the workers        [KAVA_TPU_VENV]       ~/kava-venv
  --session NAME         tmux session of the job (run/stop)                     kava
  --program PROG         run: kava-train (default) or kava-eval
  --no-distributed       run: do not add --config.distributed=True
  --allow-local-workdir  run: accept a workdir that is not gs:// (single-host slices only)
  --worker W             logs/ssh: worker index or "all" (logs: 0, ssh: all)
  --lines N              logs: lines to show (200)
  --no-follow            logs: print and exit instead of following
  --grace SECONDS        stop: how long to wait for the checkpoint-and-exit (300)
  --dry-run              print every command (gcloud, git) instead of running it
  -h, --help             this message

examples
  launch/tpu_vm.sh create --name kava-v5e --zone us-west4-a --type v5litepod-16 --spot
  launch/tpu_vm.sh push   --name kava-v5e --zone us-west4-a
  launch/tpu_vm.sh setup  --name kava-v5e --zone us-west4-a
  launch/tpu_vm.sh run    --name kava-v5e --zone us-west4-a -- \
      --config=configs/llama32_1b_gsm8k_aug.py --workdir=gs://BUCKET/kava/llama1b_aug \
      --config.model.hf_path=/home/$USER/models/Llama-3.2-1B-Instruct
  launch/tpu_vm.sh logs   --name kava-v5e --zone us-west4-a
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

# ------------------------------------------------------------------------------------ options
CMD="${1:-}"
if [[ -z "$CMD" || "$CMD" == "-h" || "$CMD" == "--help" || "$CMD" == "help" ]]; then
  usage
  [[ -z "$CMD" ]] && exit 2
  exit 0
fi
shift
case "$CMD" in
  create|status|push|setup|run|logs|ssh|stop|delete) ;;
  *) usage >&2; die "unknown command '$CMD'" ;;
esac

NAME="${KAVA_TPU_NAME:-}"
ZONE="${KAVA_TPU_ZONE:-}"
PROJECT="${KAVA_TPU_PROJECT:-}"
TYPE="${KAVA_TPU_TYPE:-v5litepod-8}"
RUNTIME="${KAVA_TPU_RUNTIME:-v2-alpha-tpuv5-lite}"
SPOT="${KAVA_TPU_SPOT:-0}"
QUEUED=1
REMOTE_DIR="${KAVA_TPU_REMOTE_DIR:-~/kava-jax}"
VENV="${KAVA_TPU_VENV:-~/kava-venv}"
SESSION="kava"
PROGRAM="kava-train"
DISTRIBUTED=1
ALLOW_LOCAL_WORKDIR=0
WORKER=""
LINES=200
FOLLOW=1
GRACE=300
DRY_RUN=0
ARGS=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  opt="$1"
  val=""
  if [[ "$opt" == --*=* ]]; then
    val="${opt#*=}"
    opt="${opt%%=*}"
    set -- "$opt" "$val" "${@:2}"
  fi
  case "$opt" in
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --type|--accelerator-type) need_value "$@"; TYPE="$2"; shift 2 ;;
    --runtime|--runtime-version) need_value "$@"; RUNTIME="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --no-queued) QUEUED=0; shift ;;
    --remote-dir) need_value "$@"; REMOTE_DIR="$2"; shift 2 ;;
    --venv) need_value "$@"; VENV="$2"; shift 2 ;;
    --session) need_value "$@"; SESSION="$2"; shift 2 ;;
    --program) need_value "$@"; PROGRAM="$2"; shift 2 ;;
    --no-distributed) DISTRIBUTED=0; shift ;;
    --allow-local-workdir) ALLOW_LOCAL_WORKDIR=1; shift ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --lines) need_value "$@"; LINES="$2"; shift 2 ;;
    --no-follow) FOLLOW=0; shift ;;
    --grace) need_value "$@"; GRACE="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "unknown option '$opt' for '$CMD' (kava-train arguments go after '--'; see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "no slice name: pass --name NAME or set KAVA_TPU_NAME"
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or set KAVA_TPU_ZONE"
[[ "$SESSION" =~ ^[A-Za-z0-9_-]+$ ]] || die "--session '$SESSION': use letters, digits, '_' and '-' only"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines '$LINES' is not a number"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "--grace '$GRACE' is not a number"
case "$PROGRAM" in kava-train|kava-eval) ;; *) die "--program '$PROGRAM': kava-train or kava-eval" ;; esac
QR_NAME="${NAME}-qr"

# `~/x` in a remote path is written as "$HOME/x" so the worker's shell expands it inside quotes.
remote_path() { if [[ "$1" == "~/"* ]]; then printf '"$HOME/%s"' "${1#\~/}"; else printf '%q' "$1"; fi; }
RDIR="$(remote_path "$REMOTE_DIR")"
RVENV="$(remote_path "$VENV")"

# ------------------------------------------------------------------------------------ helpers
# Every external command goes through `x`: printed (shell-quoted, one line) in dry-run, else run.
# shq: POSIX shell quoting (bare when safe, else single quotes), so dry-run lines paste into a shell.
shq() {
  local s="$1" sq="'"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./=:@,+%^-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$sq\\$sq$sq}"
  fi
}
x() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local out="" a
    for a in "$@"; do out+="$(shq "$a") "; done
    echo "${out% }"
  else
    "$@"
  fi
}

common_flags() {
  GFLAGS=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then GFLAGS+=(--project="$PROJECT"); fi
}
common_flags

tpu_ssh() {  # tpu_ssh WORKER REMOTE_COMMAND
  x gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker="$1" --command="$2"
}

# ------------------------------------------------------------------------------------ commands
cmd_create() {
  local spot=()
  if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
  if [[ "$QUEUED" == 1 ]]; then
    x gcloud compute tpus queued-resources create "$QR_NAME" "${GFLAGS[@]}" --node-id="$NAME" \
      --accelerator-type="$TYPE" --runtime-version="$RUNTIME" "${spot[@]}"
    [[ "$DRY_RUN" == 1 ]] || echo "queued resource $QR_NAME requested; 'launch/tpu_vm.sh status' shows when it is ACTIVE"
  else
    x gcloud compute tpus tpu-vm create "$NAME" "${GFLAGS[@]}" --accelerator-type="$TYPE" \
      --version="$RUNTIME" "${spot[@]}"
  fi
}

cmd_status() {
  if [[ "$QUEUED" == 1 ]]; then
    x gcloud compute tpus queued-resources describe "$QR_NAME" "${GFLAGS[@]}"
  fi
  x gcloud compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}"
}

cmd_push() {
  local repo archive ref
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  archive="${TMPDIR:-/tmp}/kava-jax-push-$$.tar.gz"
  if [[ "$DRY_RUN" == 1 ]]; then
    ref='$(git stash create || echo HEAD)'
    echo "git -C $(shq "$repo") archive --format=tar.gz -o $(shq "$archive") $ref"
  else
    # `git stash create` snapshots uncommitted changes to tracked files without touching the tree.
    ref="$(git -C "$repo" stash create)"
    ref="${ref:-HEAD}"
    if [[ -n "$(git -C "$repo" ls-files --others --exclude-standard)" ]]; then
      echo "tpu_vm.sh push: untracked files are NOT pushed (git add them first):" >&2
      git -C "$repo" ls-files --others --exclude-standard | head -n 20 >&2
    fi
    git -C "$repo" archive --format=tar.gz -o "$archive" "$ref"
    trap 'rm -f "$archive"' EXIT
  fi
  x gcloud compute tpus tpu-vm scp "$archive" "$NAME:kava-jax-push.tar.gz" "${GFLAGS[@]}" --worker=all
  tpu_ssh all "mkdir -p $RDIR && tar -xzf ~/kava-jax-push.tar.gz -C $RDIR && rm -f ~/kava-jax-push.tar.gz && echo \"\$(hostname): pushed\""
}

cmd_setup() {
  local remote
  remote="set -e; "
  remote+="if ! command -v tmux >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then "
  remote+="sudo apt-get update -qq && sudo apt-get install -y -qq tmux python3-venv; fi; "
  remote+="test -f $RDIR/setup.py || { echo \"\$(hostname): no checkout in $RDIR (run push first)\" >&2; exit 1; }; "
  remote+="python3 -m venv $RVENV && $RVENV/bin/pip install -q -U pip && "
  remote+="$RVENV/bin/pip install -q -e $RDIR'[tpu]' && "
  remote+="$RVENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
  tpu_ssh all "$remote"
}

workdir_of() {  # prints the value of --workdir in ARGS
  local i
  for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[$i]}" in
      --workdir=*) echo "${ARGS[$i]#--workdir=}"; return 0 ;;
      --workdir) echo "${ARGS[$((i + 1))]:-}"; return 0 ;;
    esac
  done
  return 0
}

cmd_run() {
  [[ ${#ARGS[@]} -gt 0 ]] || die "run: nothing to run; pass the $PROGRAM arguments after '--'"
  local workdir job log_name q a b64 remote
  workdir="$(workdir_of)"
  [[ -n "$workdir" ]] || die "run: no --workdir in the arguments after '--'"
  if [[ "$workdir" != gs://* && "$ALLOW_LOCAL_WORKDIR" != 1 ]]; then
    die "run: workdir '$workdir' is not a gs:// path; every host of a slice must see the same workdir (or pass --allow-local-workdir on a single-host slice)"
  fi
  if [[ "$PROGRAM" == kava-train ]]; then
    local has_config=0
    for a in "${ARGS[@]}"; do
      if [[ "$a" == --config || "$a" == --config=* ]]; then has_config=1; fi
    done
    [[ "$has_config" == 1 ]] || die "run: no --config=... in the arguments after '--'"
    if [[ "$DISTRIBUTED" == 1 ]]; then ARGS+=(--config.distributed=True); fi
  fi
  log_name="$(basename "$workdir")"
  log_name="${log_name//[^A-Za-z0-9._=+-]/_}"
  q=""
  for a in "${ARGS[@]}"; do q+=" $(printf '%q' "$a")"; done
  # The job script (the same on every host), shipped base64-encoded so no quoting has to survive
  # the two shells (local, then the worker's ssh shell) on the way.
  job="#!/usr/bin/env bash
# kava-jax job started by launch/tpu_vm.sh run (tmux session $SESSION)
set -o pipefail
args=($q)
cd $RDIR || exit 1
export KAVA_VENV=$RVENV
source launch/env.sh || exit 2
mkdir -p ~/kava-logs
log=~/kava-logs/$log_name.log
ln -sfn \"\$log\" ~/kava-logs/latest.log
echo \"[kava] \$(date -u +%FT%TZ) \$(hostname) start: $PROGRAM \${args[*]}\" | tee -a \"\$log\"
$PROGRAM \"\${args[@]}\" 2>&1 | tee -a \"\$log\"
rc=\$?
echo \"[kava] \$(date -u +%FT%TZ) \$(hostname) exit code \$rc\" | tee -a \"\$log\"
exit \$rc
"
  b64="$(printf '%s' "$job" | base64 | tr -d '\n')"
  remote="mkdir -p ~/kava-logs && "
  remote+="if tmux has-session -t $SESSION 2>/dev/null; then echo \"\$(hostname): tmux session $SESSION is running (launch/tpu_vm.sh stop first)\" >&2; exit 3; fi && "
  remote+="echo $b64 | base64 -d > ~/kava-logs/$SESSION.job.sh && "
  remote+="tmux new-session -d -s $SESSION \"bash ~/kava-logs/$SESSION.job.sh\" && "
  remote+="echo \"\$(hostname): started $PROGRAM in tmux session $SESSION\""
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# job script written to ~/kava-logs/$SESSION.job.sh on every worker:"
    printf '%s' "$job" | sed 's/^/#   /'
  fi
  tpu_ssh all "$remote"
}

cmd_logs() {
  local follow=""
  if [[ "$FOLLOW" == 1 ]]; then follow=" -F"; fi
  tpu_ssh "${WORKER:-0}" "tail -n $LINES$follow ~/kava-logs/latest.log"
}

cmd_ssh() {
  [[ ${#ARGS[@]} -gt 0 ]] || die "ssh: pass the command after '--'"
  local remote="cd $RDIR 2>/dev/null; export KAVA_VENV=$RVENV; source launch/env.sh 2>/dev/null; ${ARGS[*]}"
  tpu_ssh "${WORKER:-all}" "$remote"
}

cmd_stop() {
  # SIGTERM only the trainer inside the session's process group: it saves a checkpoint and exits,
  # then bash/tee end and the session closes. After --grace seconds the session is killed.
  local remote
  remote="if tmux has-session -t $SESSION 2>/dev/null; then "
  remote+="pg=\$(tmux list-panes -t $SESSION -F '#{pane_pid}' | head -n 1); "
  remote+="pkill -TERM -g \"\$pg\" -f '$PROGRAM' || true; "
  remote+="for i in \$(seq 1 $GRACE); do tmux has-session -t $SESSION 2>/dev/null || break; sleep 1; done; "
  remote+="tmux kill-session -t $SESSION 2>/dev/null || true; echo \"\$(hostname): stopped\"; "
  remote+="else echo \"\$(hostname): no session $SESSION\"; fi"
  tpu_ssh all "$remote"
}

cmd_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    x gcloud compute tpus queued-resources delete "$QR_NAME" "${GFLAGS[@]}" --force --quiet
  else
    x gcloud compute tpus tpu-vm delete "$NAME" "${GFLAGS[@]}" --quiet
  fi
}

if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found (install the Google Cloud CLI, or use --dry-run to print the commands)"
fi
"cmd_$CMD"
