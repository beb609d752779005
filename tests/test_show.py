"""describe_batch: the exact text of `vlm-jax data show` for a packed Idefics3 row and a left-padded row."""
import numpy as np

from vlm_jax.config import Config, DataConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlm_jax.inputs import packing, show
from vlm_jax.inputs.examples import Preprocessor
from vlm_jax.inputs.tokenizer import train_sentencepiece

CORPUS = (["<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
           "A red circle and two blue squares.\nHow many shapes are there? Three."] * 30)
RECORD = {"id": "r", "images": [np.zeros((10, 30, 3), np.uint8)], "caption": "Red.",
          "turns": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}],
          "question_types": [""]}


def test_describe_batch_exact():
  tok = train_sentencepiece(CORPUS, 400)
  # 16 px tiles of 2x2 patches, pixel shuffle 2: one <image> per tile; a 10x30 image splits into 1x2 + global.
  cfg = Config(model=ModelConfig(vision=VisionConfig(image_size=16, patch_size=8),
                                 projector=ProjectorConfig(kind="pixel_shuffle", scale_factor=2)),
               data=DataConfig(seq_len=64, max_tiles=4, image_splitting=True, max_image_size=32))
  pre = Preprocessor(cfg, tok)
  conversation, text = pre.to_example(RECORD, "conversation"), pre.to_example(RECORD, "text")
  rows = packing.pack([conversation, text], 64, 4, tok.pad_id)
  batch = packing.collate(rows + [packing.pad_example(text, 64, 4, tok.pad_id, "left")])
  out = show.describe_batch(batch, tok, rows=2)
  n1, n2 = len(conversation["input_ids"]), len(text["input_ids"])
  assert out.splitlines() == [
      "batch: input_ids int32[2, 64], labels int32[2, 64], segment_ids int32[2, 64], positions int32[2, 64], "
      "pixel_values uint8[2, 4, 16, 16, 3], tile_mask bool[2, 4]",
      f"row 0: segments 1:{n1} tokens pos 0..{n1 - 1} | 2:{n2} tokens pos 0..{n2 - 1} | pad {64 - n1 - n2} right"
      f" | labelled {len(tok.encode('Red.<|im_end|>')) + n2 - 1} | tiles 3/4",
      "  images 1: 1x2 grid + global",
      "  text 1: <|im_start|>user\\n<fake_token_around_image><row_1_col_1><image>*1<fake_token_around_image>"
      "<row_1_col_2><image>*1\\n\\n<fake_token_around_image><global-img><image>*1<fake_token_around_image>"
      "Colour?<|im_end|>\\n<|im_start|>assistant\\n[[Red.<|im_end|>]]\\n",
      "  images 2: none",
      "  text 2: <s>[[Red.\\nColour?\\nRed.</s>]]",
      f"row 1: segments 1:{n2} tokens pos 0..{n2 - 1} | pad {64 - n2} left | labelled {n2 - 1} | tiles 0/4",
      "  images 1: none",
      "  text 1: <s>[[Red.\\nColour?\\nRed.</s>]]",
  ]


def test_describe_image_text_and_collapse():
  tok = train_sentencepiece(CORPUS, 400)
  row = packing.pad_image_text({"pixel_values": np.full((1, 4, 4, 3), 0.25, np.float32),
                                "text_ids": tok.encode("Red.") + [tok.eos_id]}, 8, tok.pad_id)
  out = show.describe_batch(packing.collate([row]), tok)
  n = len(tok.encode("Red.")) + 1
  assert out.splitlines()[1] == f"row 0: image [1, 4, 4, 3] mean 0.250 | text {n}/8 tokens: Red.</s>"
  assert show.collapse_images("a<image><image>b<image>") == "a<image>*2b<image>*1"


def test_show_config_batch_on_prepared_shapes(tmp_path):
  """`vlm-jax data show` end to end: prepare a tiny shapes_vqa, load its tokenizer, describe 2 rows."""
  from vlm_jax import config as config_lib, datasets  # pylint: disable=import-outside-toplevel
  options = dict(num_train=8, num_validation=4, num_test=4)
  datasets.prepare("shapes_vqa", str(tmp_path), **options)
  dataset = f"shapes_vqa/{datasets.get_builder('shapes_vqa', str(tmp_path), **options).builder_config.name}"
  cfg = config_lib.load("shapes_tiny", [f"data.data_dir={tmp_path}", "data.seq_len=192",  # pinned: LLaVA-style
                                        "model.projector.kind=mlp", "model.vision.post_layernorm=false",
                                        f"train.stages.instruct.datasets=[('{dataset}', 1.0)]"])
  out = show.show_config_batch(cfg, split="validation", stage="instruct", rows=2).splitlines()
  assert out[0] == f"stage instruct (task conversation) on validation of {dataset}"
  assert out[1].startswith("batch: input_ids int32[2, 192], labels int32[2, 192], "
                           "pixel_values uint8[2, 2, 48, 48, 3]")
  rows = [line for line in out if line.startswith("row ")]
  assert [r.split(":")[0] for r in rows] == ["row 0", "row 1"]
  texts = [line for line in out if line.startswith("  text 1: ")]
  assert len(texts) == 2 and all(t.startswith("  text 1: <|im_start|>user\\n<image>*36") for t in texts)
  assert all("<|im_start|>assistant\\n[[" in t and t.endswith("<|im_end|>]]\\n") for t in texts)
