"""Everything the model is fed: tokens, pixels, chat rendering, packing. Knows nothing of the model."""
