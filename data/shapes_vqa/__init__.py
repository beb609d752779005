"""shapes_vqa: procedural shapes VQA (scenes.py samples and renders, shapes_vqa.py is the TFDS builder)."""
from vlm_jax.datasets.shapes_vqa.shapes_vqa import ShapesVqa, ShapesVqaConfig, make_config, tokenizer_dir

__all__ = ["ShapesVqa", "ShapesVqaConfig", "make_config", "tokenizer_dir"]
