"""`vlm-jax bench --loader`: the counts behind its rates, its verdict against the step, and its input checks."""
import pathlib

import numpy as np
import pytest
from fixtures_data import shapes_data_dir  # noqa: F401  (fixture)

from vlm_jax import cli
from vlm_jax import config as config_lib
from vlm_jax.bench import loader as loader_bench
from vlm_jax.inputs import loader
from vlm_jax.inputs.tokenizer import load_tokenizer

CONFIG = str(pathlib.Path(__file__).parent / "tiny_run_config.py")


def test_batch_counts_of_packed_and_contrastive_batches():
  packed = {"segment_ids": np.array([[1, 1, 2, 0], [1, 1, 1, 1], [1, 2, 3, 0]]), "pixel_values": np.zeros((3, 2)),
            "tile_mask": np.array([[True, True], [True, False], [False, False]])}
  assert loader_bench.batch_counts(packed) == {"rows": 3, "records": 6, "tiles": 3, "tokens": 10}
  contrastive = {"pixel_values": np.zeros((2, 1, 4, 4, 3)), "text_ids": np.zeros((2, 5), np.int32),
                 "text_mask": np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)}
  assert loader_bench.batch_counts(contrastive) == {"rows": 2, "records": 2, "tiles": 2, "tokens": 6}


def test_loader_rates_and_the_verdict_against_the_step(shapes_data_dir, capsys):  # noqa: F811
  cfg = config_lib.load(CONFIG, [f"data.data_dir={shapes_data_dir}"])
  slow = loader_bench.run(cfg, stage="align", hosts=2, batches=3, step_seconds=1e-6)
  assert slow["host_rows"] == 4 and slow["batches"] == 3 and slow["read_threads"] == 2
  # The rates are the counts of the batches after the first (the same batches the loader makes) over the time.
  it = loader.make_loader(cfg, cfg.train.stage("align"), load_tokenizer(cfg), process_index=0, process_count=2)
  batches = [next(it) for _ in range(4)][1:]
  seconds = slow["batch_s"] * 3
  assert slow["rows_per_s"] * seconds == pytest.approx(12)
  assert slow["records_per_s"] == slow["rows_per_s"]  # caption rows, no packing: one record each
  assert slow["tiles_per_s"] * seconds == pytest.approx(sum(b["tile_mask"].sum() for b in batches))
  assert slow["tokens_per_s"] * seconds == pytest.approx(sum((b["segment_ids"] > 0).sum() for b in batches))
  assert slow["rows_needed_per_s"] == pytest.approx(4e6) and not slow["keeps_up"]
  assert "FINDING: the loader is slower than the step" in loader_bench.table(slow)
  fast = {**slow, "step_seconds": 1e6, "rows_needed_per_s": 4e-6, "keeps_up": True}
  assert "keeps up" in loader_bench.table(fast) and "FINDING" not in loader_bench.table(fast)
  assert "pass --step-seconds" in loader_bench.table({**slow, "step_seconds": None})

  assert cli.main(["bench", "--loader", "--config", CONFIG, "--set", f"data.data_dir={shapes_data_dir}",
                   "--stage", "align", "--hosts", "3"]) == 2
  assert "--hosts 3 must be >= 1 and divide the stage's batch_size 8" in capsys.readouterr().err
