#!/usr/bin/env bash
# Creates a TPU VM (or a queued resource that becomes one) for vlm_jax.
source "$(dirname "$0")/common.sh"
USAGE="Usage: tpu/create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]

Creates a TPU VM named NAME, or with --queued a queued resource whose node is NAME (waits in line for
capacity instead of failing when the zone is full).

  --name NAME              TPU VM (node) name; also the queued resource id
  --zone ZONE              e.g. us-west4-a (v5e), us-east5-a (v5p), us-central2-b (v4)
  --accelerator-type TYPE  e.g. v5litepod-8, v5p-8, v4-8, v6e-8
  --version VERSION        TPU runtime (software) version; default from the type:
                           v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
                           v4 and older tpu-ubuntu2204-base
  --spot                   Spot capacity (cheaper, preemptible)
  --queued                 create through the queued-resources API
  --project PROJECT        default: gcloud's configured project
  --dry-run                print the gcloud command instead of running it
  --help                   this text"
FLAGS=(name zone accelerator-type version project spot! queued!)
parse_flags "$@"
require name zone accelerator-type
target_flags

default_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) die "no default --version for accelerator type '$1'; pass --version" ;;
  esac
}
version="${opt_version:-$(default_version "$opt_accelerator_type")}"

spot=()
if [[ "$opt_spot" == 1 ]]; then spot=(--spot); fi
if [[ "$opt_queued" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$opt_name" "${TARGET[@]}" --node-id="$opt_name" \
    --accelerator-type="$opt_accelerator_type" --runtime-version="$version" "${spot[@]}"
  if [[ "$opt_dry_run" == 0 ]]; then
    echo "Queued. Watch it with: gcloud compute tpus queued-resources describe $opt_name ${TARGET[*]}" >&2
  fi
else
  run gcloud compute tpus tpu-vm create "$opt_name" "${TARGET[@]}" --accelerator-type="$opt_accelerator_type" \
    --version="$version" "${spot[@]}"
fi
