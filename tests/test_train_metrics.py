"""vlm_jax.train.metrics.MetricsWriter: metrics.jsonl and TensorBoard events with the logged values, written
without importing torch (tensorboardX would, and a training process never needs it)."""
import json
import subprocess
import sys

from fixtures_train import tensorboard_events

WRITE = """
import sys
from vlm_jax.train import metrics
writer = metrics.MetricsWriter(sys.argv[1], "align")
writer.write(3, {"loss": 0.25, "moe/expert_load": [0.5, 0.25, 0.25]})
writer.close()
print(sorted(m for m in ("torch", "tensorboardX") if m in sys.modules))
"""


def test_a_writer_logs_scalars_and_vectors_without_importing_torch(tmp_path):
  out = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path)], check=True, capture_output=True, text=True)
  assert out.stdout.strip().splitlines()[-1] == "['tensorboardX']"
  record = json.loads((tmp_path / "align" / "metrics.jsonl").read_text())
  assert record == {"step": 3, "loss": 0.25, "moe/expert_load/0": 0.5, "moe/expert_load/1": 0.25,
                    "moe/expert_load/2": 0.25}
  values = [(e.step, v) for e in tensorboard_events(tmp_path / "tensorboard" / "align") for v in e.summary.value]
  scalars = {(step, v.tag): v.simple_value for step, v in values if v.HasField("simple_value")}
  assert scalars == {(3, "train/loss"): 0.25, (3, "moe/expert_load/0"): 0.5, (3, "moe/expert_load/1"): 0.25,
                     (3, "moe/expert_load/2"): 0.25}
  [histogram] = [v.histo for _, v in values if v.HasField("histo")]
  assert list(histogram.bucket) == [0.5, 0.25, 0.25] and histogram.num == 1.0 and histogram.sum == 0.75
