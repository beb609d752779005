"""A tiny byte-level BPE tokenizer of the tokenizer.json kind HF models ship, trained in the test (no downloads)."""
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers


def bpe_tokenizer(corpus: list[str], vocab_size: int = 300) -> tokenizers.Tokenizer:
  """Byte-level BPE (GPT-2 style, no prefix space) trained on `corpus`; `<|endoftext|>` is its one special token."""
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return tk
