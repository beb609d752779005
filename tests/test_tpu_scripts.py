"""tpu/*.sh: the exact gcloud command lines under --dry-run, flag errors, and that a real run passes the
same argv to gcloud (a fake gcloud on PATH records what it receives)."""
import os
import pathlib
import shlex
import subprocess

import pytest

TPU = pathlib.Path(__file__).resolve().parent.parent / "tpu"
SCRIPTS = ("create", "setup", "launch", "logs", "delete")




@pytest.fixture(scope="module", autouse=True)
def no_real_gcloud(tmp_path_factory):
  """Puts a gcloud first on PATH that fails loudly, so no test can reach a real one by mistake."""
  guard = tmp_path_factory.mktemp("guard")
  (guard / "gcloud").write_text("#!/usr/bin/env bash\necho 'real gcloud called' >&2\nexit 99\n")
  (guard / "gcloud").chmod(0o755)
  os.environ["PATH"] = f"{guard}:{os.environ['PATH']}"
  yield
  os.environ["PATH"] = os.environ["PATH"].replace(f"{guard}:", "", 1)


def sh(script, *args, env=None):
  return subprocess.run(["bash", str(TPU / f"{script}.sh"), *args], capture_output=True, text=True,
                        env=env or {**os.environ, "TMPDIR": "/tmp"}, timeout=30)


def dry(script, *args):
  """Runs a script with --dry-run (first, so it never lands after `--`) and returns its printed lines."""
  out = sh(script, "--dry-run", *args)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def remote_command(line):
  """The --command=... of a printed `gcloud ... ssh` line, as the remote shell's argv."""
  (command,) = [a for a in shlex.split(line) if a.startswith("--command=")]
  return command[len("--command="):]


def test_create_tpu_vm_spot():
  assert dry("create", "--name", "vlm1", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-8", "--spot") == [
      "gcloud compute tpus tpu-vm create vlm1 --zone=us-west4-a --accelerator-type=v5litepod-8 "
      "--version=v2-alpha-tpuv5-lite --spot"]


@pytest.mark.parametrize("accel, version", [("v6e-8", "v2-alpha-tpuv6e"), ("v5p-8", "v2-alpha-tpuv5"),
                                            ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                            ("v4-32", "tpu-ubuntu2204-base")])
def test_create_default_runtime_version(accel, version):
  assert dry("create", "--name=n", "--zone=z", f"--accelerator-type={accel}") == [
      f"gcloud compute tpus tpu-vm create n --zone=z --accelerator-type={accel} --version={version}"]


def test_create_queued_resource_with_project_and_version():
  assert dry("create", "--name", "n", "--zone", "us-east5-a", "--accelerator-type", "v5p-8", "--queued",
             "--version", "v2-alpha-tpuv5-custom", "--project", "my-proj", "--spot") == [
      "gcloud compute tpus queued-resources create n --zone=us-east5-a --project=my-proj --node-id=n "
      "--accelerator-type=v5p-8 --runtime-version=v2-alpha-tpuv5-custom --spot"]


def test_create_unknown_type_needs_version():
  out = sh("create", "--dry-run", "--name", "n", "--zone", "z", "--accelerator-type", "tpu9-8")
  assert out.returncode == 2 and "pass --version" in out.stderr and out.stdout == ""


def test_delete():
  assert dry("delete", "--name", "n", "--zone", "z") == ["gcloud compute tpus tpu-vm delete n --zone=z --quiet"]
  assert dry("delete", "--name", "n", "--zone", "z", "--queued") == [
      "gcloud compute tpus queued-resources delete n --zone=z --force --quiet"]


def test_setup_copies_local_tree_and_installs_on_all_workers(tmp_path):
  lines = dry("setup", "--name", "n", "--zone", "z", "--src", str(tmp_path))
  assert lines[:3] == [
      f"tar -czf /tmp/vlm_jax-n.tar.gz --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ "
      f"--exclude='*.egg-info' -C {tmp_path} .",
      "gcloud compute tpus tpu-vm scp /tmp/vlm_jax-n.tar.gz n:vlm_jax.tar.gz --zone=z --worker=all",
      "gcloud compute tpus tpu-vm ssh n --zone=z --worker=all "
      "--command='mkdir -p vlm_jax && tar -xzf vlm_jax.tar.gz -C vlm_jax && rm vlm_jax.tar.gz'"]
  assert len(lines) == 4 and lines[3].startswith("gcloud compute tpus tpu-vm ssh n --zone=z --worker=all --command=")
  install = remote_command(lines[3]).split(" && ")
  assert install[1:] == [
      "cd vlm_jax", "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
      "uv venv -q --allow-existing --python 3.11 .venv", 'uv pip install -q --python .venv/bin/python -e ".[tpu]"',
      '.venv/bin/python -c "import jax, libtpu, vlm_jax; print(jax.__version__)"']


def test_setup_from_git():
  lines = dry("setup", "--name", "n", "--zone", "z", "--repo", "https://github.com/me/vlm_jax.git", "--branch",
              "v1")
  assert len(lines) == 2
  assert remote_command(lines[0]) == (
      "if [ -d vlm_jax/.git ]; then git -C vlm_jax fetch -q origin v1 && git -C vlm_jax reset -q --hard FETCH_HEAD; "
      "else git clone -q --branch v1 https://github.com/me/vlm_jax.git vlm_jax; fi")
  assert "--worker=all" in lines[0] and "pip install" in remote_command(lines[1])
  out = sh("setup", "--dry-run", "--name", "n", "--zone", "z", "--repo", "r", "--src", "/x")
  assert out.returncode == 2 and "not both" in out.stderr


def test_launch_runs_train_on_all_workers():
  (line,) = dry("launch", "--name", "n", "--zone", "z", "--config", "smolvlm_256m", "--workdir", "gs://b/run 1",
                "--stage", "align", "--set", "train.stages.align.steps=10", "--set", "data.data_dir=gs://b/tfds",
                "--", "--extra")
  assert line.startswith("gcloud compute tpus tpu-vm ssh n --zone=z --worker=all --command=")
  command = remote_command(line)
  prefix = "cd vlm_jax && mkdir -p logs && unset JAX_PLATFORMS && nohup "
  suffix = " > logs/train.log 2>&1 < /dev/null &"
  assert command.startswith(prefix) and command.endswith(suffix)
  assert shlex.split(command[len(prefix):-len(suffix)]) == [
      ".venv/bin/vlm-jax", "train", "--config", "smolvlm_256m", "--workdir", "gs://b/run 1", "--stage", "align",
      "--set", "train.stages.align.steps=10", "data.data_dir=gs://b/tfds", "--extra"]


def test_logs():
  assert dry("logs", "--name", "n", "--zone", "z", "--worker", "3", "--lines", "20", "--log", "instruct") == [
      "gcloud compute tpus tpu-vm ssh n --zone=z --worker=3 --command='tail -n 20 -F vlm_jax/logs/instruct.log'"]
  assert dry("logs", "--name", "n", "--zone", "z", "--no-follow") == [
      "gcloud compute tpus tpu-vm ssh n --zone=z --worker=0 --command='tail -n 100 vlm_jax/logs/train.log'"]
  out = sh("logs", "--dry-run", "--name", "n", "--zone", "z", "--worker", "all")
  assert out.returncode == 2 and "--worker must be a worker number" in out.stderr


@pytest.mark.parametrize("script, missing", [("create", "--name --zone --accelerator-type"),
                                             ("setup", "--name --zone"),
                                             ("launch", "--name --zone --config --workdir"),
                                             ("logs", "--name --zone"), ("delete", "--name --zone")])
def test_missing_required_flags(script, missing):
  out = sh(script, "--dry-run")
  assert out.returncode == 2 and out.stdout == ""
  assert f"{script}.sh: missing required flag(s): {missing} (see --help)" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_unknown_flag(script):
  out = sh(script, "--help")
  assert out.returncode == 0 and out.stdout.startswith(f"Usage: tpu/{script}.sh --name NAME --zone ZONE")
  out = sh(script, "--dry-run", "--name", "n", "--zone", "z", "--nope")
  assert out.returncode == 2 and "unknown flag --nope" in out.stderr
  out = sh(script, "--name", "n", "--zone")
  assert out.returncode == 2 and "--zone needs a value" in out.stderr


def test_real_run_passes_the_printed_argv_to_gcloud(tmp_path):
  """Without --dry-run the same command runs: a fake gcloud records argv, one argument per line."""
  record = tmp_path / "argv"
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
  fake.chmod(0o755)
  args = ("--name", "n", "--zone", "z", "--config", "c", "--workdir", "gs://b/it's", "--set", "a.b='x y'")
  (printed,) = dry("launch", *args)
  out = sh("launch", *args, env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"})
  assert out.returncode == 0, out.stderr
  assert record.read_text().splitlines() == shlex.split(printed)[1:]
  assert out.stderr.splitlines()[0] == f"+ {printed}"
