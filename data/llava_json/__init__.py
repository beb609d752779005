"""llava_json: LLaVA-format JSON + image folder (records.py repairs or skips records, llava_json.py builds)."""
from vlm_jax.datasets.llava_json.llava_json import COUNTS_FILE, LlavaJson, LlavaJsonConfig

__all__ = ["COUNTS_FILE", "LlavaJson", "LlavaJsonConfig"]
