#!/usr/bin/env bash
# Puts the project on every worker of a TPU VM and installs it with the TPU extras.
source "$(dirname "$0")/common.sh"
USAGE="Usage: tpu/setup.sh --name NAME --zone ZONE [--repo URL [--branch BRANCH] | --src DIR] [options]

Copies the project to ~/$REMOTE_DIR on all workers, then installs it there into ~/$REMOTE_DIR/.venv with
'pip install -e .[tpu]' (through uv, which also fetches a Python the project supports: TPU runtime images
ship Ubuntu 22.04's Python 3.10, older than jax needs). Run it again after changing code.

  --name NAME        TPU VM name
  --zone ZONE        its zone
  --repo URL         git clone URL on the workers (they need read access); default: copy --src
  --branch BRANCH    branch or tag to check out with --repo (default: main)
  --src DIR          local project folder to copy (default: this checkout); .git, .venv and runs/ are left out
  --python VERSION   Python for the workers' venv (default: 3.11)
  --project PROJECT  default: gcloud's configured project
  --dry-run          print the commands instead of running them
  --help             this text"
FLAGS=(name zone project repo branch src python)
parse_flags "$@"
require name zone
target_flags
branch="${opt_branch:-main}"
python="${opt_python:-3.11}"

if [[ -n "$opt_repo" ]]; then
  [[ -z "$opt_src" ]] || die "pass --repo or --src, not both"
  q_repo="$(quote "$opt_repo")"; q_branch="$(quote "$branch")"
  on_workers all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin $q_branch && \
git -C $REMOTE_DIR reset -q --hard FETCH_HEAD; else git clone -q --branch $q_branch $q_repo $REMOTE_DIR; fi"
else
  src="${opt_src:-$(cd "$(dirname "$0")/.." && pwd)}"
  tarball="${TMPDIR:-/tmp}/$REMOTE_DIR-$opt_name.tar.gz"
  run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
    --exclude='*.egg-info' -C "$src" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$opt_name:$REMOTE_DIR.tar.gz" "${TARGET[@]}" --worker=all
  # Untar over the old copy: the workers' .venv and logs/ survive a re-run.
  on_workers all "mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR && rm $REMOTE_DIR.tar.gz"
fi

on_workers all "export PATH=\$HOME/.local/bin:\$PATH && cd $REMOTE_DIR && \
(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh) && \
uv venv -q --allow-existing --python $(quote "$python") .venv && \
uv pip install -q --python .venv/bin/python -e \".[tpu]\" && \
.venv/bin/python -c \"import jax, libtpu, vlm_jax; print(jax.__version__)\""
