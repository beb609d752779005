"""TFDS's on-disk shuffle buckets without TensorFlow.

When a split outgrows TFDS's in-memory buffer (`shuffle.MAX_MEM_BUFFER_SIZE`, 1 GB), its Shuffler spills the
serialized examples into 1000 bucket files, then sorts one bucket at a time: that is what keeps preparing a
10 GB dataset within memory. TFDS writes those files with `tf.io.gfile`, which fails without TensorFlow
(`No module named 'tensorflow'`). `install()` swaps in a bucket with the same file layout (key 16 bytes | size
8 bytes | data) written through etils.epath (local or gs://).
"""
from __future__ import annotations

import errno
import importlib.util
import struct

from etils import epath
from tensorflow_datasets.core import shuffle


class EpathBucket(shuffle._Bucket):  # pylint: disable=protected-access
  """A shuffle bucket file read and written through etils.epath."""

  def add(self, key: int, data: bytes) -> None:
    if not self._fobj:
      path = epath.Path(self._path)
      path.parent.mkdir(parents=True, exist_ok=True)
      try:
        self._fobj = path.open("wb")
      except OSError as e:  # 1000 buckets are open at once
        if e.errno != errno.EMFILE:
          raise
        shuffle._increase_open_files_limit()  # pylint: disable=protected-access
        self._fobj = path.open("wb")
    self._fobj.write(shuffle._hkey_to_bytes(key) + struct.pack("=Q", len(data)))  # pylint: disable=protected-access
    self._fobj.write(data)
    self._length += 1
    self._size += len(data)

  def read_values(self):
    self.flush()
    path = epath.Path(self._path)
    if not path.exists():  # nothing was added
      return
    with path.open("rb") as f:
      while head := f.read(shuffle.HKEY_SIZE_BYTES):
        size = struct.unpack("=Q", f.read(8))[0]
        yield shuffle._read_hkey(head), f.read(size)  # pylint: disable=protected-access

  def del_file(self) -> None:
    epath.Path(self._path).unlink(missing_ok=True)


def install() -> None:
  """Use EpathBucket in TFDS's Shuffler when TensorFlow is not installed (idempotent)."""
  if importlib.util.find_spec("tensorflow") is None:
    shuffle._Bucket = EpathBucket  # pylint: disable=protected-access
