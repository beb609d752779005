"""A `vlm-jax serve` process on 127.0.0.1 (a free port) over a tiny workdir of random params, for the serve tests.

`served` (module-scoped) builds the workdir, starts the server and waits for /health; it yields
(workdir, base_url, process). The test module may stop the process itself (the SIGTERM test); otherwise it is
terminated at the end of the module.
"""
import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from fixtures_convert import CORPUS
from fixtures_workdir import make_workdir, tiny_config
from PIL import Image

from vlm_jax.inputs.tokenizer import train_sentencepiece

SLOTS = 4
# The server process compiles with the tests' persistent cache (conftest.py) and their 8 CPU devices.
SERVER = """
import os, sys, jax
jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/vlm_jax/jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from vlm_jax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def png_data_url(image: np.ndarray, fmt: str = "PNG", **save) -> str:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **save)
  return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(workdir, *extra) -> tuple[str, subprocess.Popen]:
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-c", SERVER, "serve", "--workdir", str(workdir), "--port", str(port),
                           "--slots", str(SLOTS), *extra], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 300
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
    try:
      with urllib.request.urlopen(url + "/health", timeout=2) as r:
        if r.status == 200:
          return url, proc
    except OSError:
      time.sleep(0.3)
  proc.kill()
  raise RuntimeError(f"the server did not answer within 300 s:\n{proc.stdout.read()}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  make_workdir(root / "tiny", tiny_config(512), train_sentencepiece(CORPUS, 400), finished=("align", "instruct"))
  url, proc = start_server(root / "tiny", "--allow-local-files")
  yield root / "tiny", url, proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()
