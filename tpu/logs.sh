#!/usr/bin/env bash
# Shows the training log of one TPU worker.
source "$(dirname "$0")/common.sh"
USAGE="Usage: tpu/logs.sh --name NAME --zone ZONE [--worker N] [--lines N] [--no-follow] [options]

Prints the last lines of ~/$REMOTE_DIR/logs/LOG.log on worker N and keeps following it (Ctrl-C stops
following; training goes on). Worker 0 writes the metrics; the others mostly repeat it.

  --name NAME        TPU VM name
  --zone ZONE        its zone
  --worker N         which worker (default: 0)
  --log LOG          log file name given to tpu/launch.sh (default: train)
  --lines N          lines to show (default: 100)
  --no-follow        print and exit instead of following
  --project PROJECT  default: gcloud's configured project
  --dry-run          print the gcloud command instead of running it
  --help             this text"
FLAGS=(name zone project worker log lines no-follow!)
parse_flags "$@"
require name zone
target_flags
worker="${opt_worker:-0}"
lines="${opt_lines:-100}"
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$worker'"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$lines'"

follow=(-F)
if [[ "$opt_no_follow" == 1 ]]; then follow=(); fi
on_workers "$worker" "$(quote tail -n "$lines" "${follow[@]}" "$REMOTE_DIR/logs/${opt_log:-train}.log")"
