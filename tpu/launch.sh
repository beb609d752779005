#!/usr/bin/env bash
# Starts `vlm-jax train` on every worker of a TPU VM, in the background, logging to a file.
source "$(dirname "$0")/common.sh"
USAGE="Usage: tpu/launch.sh --name NAME --zone ZONE --config CONFIG --workdir gs://BUCKET/RUN [options] [-- ARGS]

Runs the same 'vlm-jax train --config CONFIG --workdir WORKDIR ...' on all workers at once (a multi-host
slice needs every host in the run), detached with nohup so it survives the ssh connection closing; output goes to
~/$REMOTE_DIR/logs/LOG.log on each worker (read it with tpu/logs.sh). JAX_PLATFORMS is unset so JAX
uses the TPU. Training resumes from WORKDIR, so relaunching after a preemption continues the run.

  --name NAME        TPU VM name
  --zone ZONE        its zone
  --config CONFIG    config name in configs/ (e.g. smolvlm_256m) or a path inside the project
  --workdir DIR      run directory; use gs:// so every host and later runs see the checkpoints
  --stage STAGE      run only this stage (default: all stages, in order)
  --set KEY=VALUE    config override; repeat the flag for several
  --log LOG          log file name on the workers (default: train)
  --project PROJECT  default: gcloud's configured project
  --dry-run          print the gcloud command instead of running it
  --help             this text
  -- ARGS            more arguments for 'vlm-jax train'"
FLAGS=(name zone project config workdir stage set log)
parse_flags "$@"
require name zone config workdir
target_flags
log="logs/${opt_log:-train}.log"

train=(.venv/bin/vlm-jax train --config "$opt_config" --workdir "$opt_workdir")
if [[ -n "$opt_stage" ]]; then train+=(--stage "$opt_stage"); fi
if ((${#SETS[@]})); then train+=(--set "${SETS[@]}"); fi  # the CLI takes one --set with many values
train+=("${EXTRA[@]}")

on_workers all "cd $REMOTE_DIR && mkdir -p logs && unset JAX_PLATFORMS && \
nohup $(quote "${train[@]}") > $log 2>&1 < /dev/null &"
if [[ "$opt_dry_run" == 0 ]]; then
  echo "Started. Follow worker 0 with: tpu/logs.sh --name $opt_name --zone $opt_zone --log ${opt_log:-train}" >&2
fi
