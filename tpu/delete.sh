#!/usr/bin/env bash
# Deletes a TPU VM (or its queued resource together with the node).
source "$(dirname "$0")/common.sh"
USAGE="Usage: tpu/delete.sh --name NAME --zone ZONE [--queued] [--project PROJECT] [--dry-run]

Deletes the TPU VM NAME without asking. With --queued deletes the queued resource NAME and its node.
Checkpoints and metrics in gs:// workdirs are kept; anything only on the VMs' disks is lost."
FLAGS=(name zone project queued!)
parse_flags "$@"
require name zone
target_flags

if [[ "$opt_queued" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$opt_name" "${TARGET[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$opt_name" "${TARGET[@]}" --quiet
fi
