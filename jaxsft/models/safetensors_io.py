"""safetensors files without torch: a memory-mapped reader, a writer, and checkpoint sharding.

Our own reader and writer rather than `safetensors.numpy`, so bfloat16 (via ml_dtypes) and a bad file
behave the same on every safetensors version: a malformed header is an InputError naming the file.

`Reader.read_slice` reads one rectangular block of a tensor with positioned reads (no memory map), in chunks
of whole rows of at most `CHUNK_BYTES`, so a process that loads only its shards never maps or buffers the
rest of the tensor: file pages it does not need never enter its resident memory.
"""

import json
import math
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

from jaxsft.errors import InputError

SINGLE_FILE = 'model.safetensors'
CHUNK_BYTES = 4 * 2**20  # The most `read_slice` reads beyond the block it returns (at least one row).
INDEX_FILE = 'model.safetensors.index.json'

DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}


def read_header(path: pathlib.Path) -> tuple[dict, int]:
  """(header without __metadata__, byte offset of the data section)."""
  try:
    size = path.stat().st_size
    with open(path, 'rb') as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise InputError(f'{path}: not a safetensors file (too short)')
      (header_len,) = struct.unpack('<Q', prefix)
      if header_len > size - 8:
        raise InputError(f'{path}: not a safetensors file (header length {header_len} past the end)')
      header = json.loads(f.read(header_len))
  except OSError as e:
    raise InputError(f'{path}: cannot read ({e.strerror or e})') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f'{path}: not a safetensors file (bad header: {e})') from None
  if not isinstance(header, dict):
    raise InputError(f'{path}: not a safetensors file (header is not an object)')
  header.pop('__metadata__', None)
  start = 8 + header_len
  for name, info in header.items():
    try:
      dtype = DTYPES[info['dtype']]
      begin, end = info['data_offsets']
      count = math.prod(info['shape'])
    except (KeyError, TypeError, ValueError):
      raise InputError(f'{path}: tensor {name!r} has an unsupported or malformed header entry {info!r}') from None
    if end - begin != count * dtype.itemsize or begin < 0 or start + end > size:
      raise InputError(f'{path}: tensor {name!r} has inconsistent data offsets {info["data_offsets"]}')
  return header, start


class Reader:
  """Memory-mapped tensors of one or more safetensors files; `get(name)` returns a read-only view."""

  def __init__(self, files: dict[str, pathlib.Path]):
    self._where = {}  # name → (file, header entry, data start)
    self._maps = {}
    for name, path in files.items():
      if path not in self._maps:
        header, start = read_header(path)
        self._maps[path] = (header, start, None)
      header, start, _ = self._maps[path]
      if name not in header:
        raise InputError(f'{path}: tensor {name!r} is missing (listed in {INDEX_FILE})')
      self._where[name] = path

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def names(self) -> list[str]:
    return list(self._where)

  def file_of(self, name: str) -> pathlib.Path:
    return self._where[name]

  def get(self, name: str) -> np.ndarray:
    path = self._where[name]
    header, start, mm = self._maps[path]
    if mm is None:
      mm = np.memmap(path, dtype=np.uint8, mode='r')
      self._maps[path] = (header, start, mm)
    info = header[name]
    begin, end = info['data_offsets']
    dtype = DTYPES[info['dtype']].newbyteorder('<')
    return mm[start + begin:start + end].view(dtype).reshape(info['shape'])

  def shape(self, name: str) -> tuple[int, ...]:
    path = self._where[name]
    return tuple(self._maps[path][0][name]['shape'])

  def read_slice(self, name: str, ranges) -> np.ndarray:
    """tensor[r0[0]:r0[1], r1[0]:r1[1], ...] as a fresh array, reading only those bytes (plus at most one chunk).

    Args:
      name: the tensor.
      ranges: one (start, stop) per axis, within the tensor's shape.
    """
    path = self._where[name]
    header, start, _ = self._maps[path]
    info = header[name]
    shape = tuple(info['shape'])
    dtype = DTYPES[info['dtype']].newbyteorder('<')
    ranges = [(int(a), int(b)) for a, b in ranges]
    if len(ranges) != len(shape) or any(not 0 <= a <= b <= n for (a, b), n in zip(ranges, shape)):
      raise ValueError(f'{path}: block {ranges} is outside tensor {name!r} of shape {list(shape)}')
    out = np.empty([b - a for a, b in ranges], dtype)
    if out.size == 0:
      return out
    base = start + info['data_offsets'][0]
    if not shape:
      _pread_into(path, out, base)
      return out
    row_shape = shape[1:]
    row_bytes = math.prod(row_shape) * dtype.itemsize
    (r0, r1), rest = ranges[0], ranges[1:]
    if all(r == (0, n) for r, n in zip(rest, row_shape)):  # Whole rows: one contiguous read.
      _pread_into(path, out, base + r0 * row_bytes)
      return out
    rows_per_chunk = max(1, CHUNK_BYTES // max(row_bytes, 1))
    buf = np.empty((min(rows_per_chunk, r1 - r0), *row_shape), dtype)
    inner = (slice(None),) + tuple(slice(a, b) for a, b in rest)
    for row in range(r0, r1, rows_per_chunk):
      n = min(rows_per_chunk, r1 - row)
      _pread_into(path, buf[:n], base + row * row_bytes)
      out[row - r0:row - r0 + n] = buf[:n][inner]
    return out


def _pread_into(path: pathlib.Path, out: np.ndarray, offset: int) -> None:
  """Fills the contiguous array `out` with the bytes of `path` from `offset`."""
  view = memoryview(out.reshape(-1).view(np.uint8))
  fd = os.open(path, os.O_RDONLY)
  try:
    done = 0
    while done < len(view):
      n = os.preadv(fd, [view[done:]], offset + done)
      if n <= 0:
        raise InputError(f'{path}: unexpected end of file at byte {offset + done}')
      done += n
  finally:
    os.close(fd)


def open_checkpoint(model_dir: pathlib.Path) -> Reader:
  single = model_dir / SINGLE_FILE
  index = model_dir / INDEX_FILE
  if single.is_file():
    header, _ = read_header(single)
    return Reader({name: single for name in header})
  if index.is_file():
    try:
      with open(index, encoding='utf-8') as f:
        weight_map = json.load(f)['weight_map']
      files = {name: model_dir / file for name, file in weight_map.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise InputError(f'{index}: not a safetensors index ({type(e).__name__}: {e})') from None
    for name, path in files.items():
      if not path.is_file():
        raise InputError(f'{index}: tensor {name!r} maps to missing file {path.name!r}')
    return Reader(files)
  raise InputError(f'{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)')


def write_file(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  """Writes `tensors` in the safetensors format (metadata format=pt, as transformers writes)."""
  dtype_names = {v: k for k, v in DTYPES.items()}
  header, offset = {}, 0
  for name, value in tensors.items():
    nbytes = value.size * value.dtype.itemsize
    header[name] = {'dtype': dtype_names[value.dtype], 'shape': list(value.shape),
                    'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  header['__metadata__'] = {'format': 'pt'}
  blob = json.dumps(header, separators=(',', ':')).encode('utf-8')
  blob += b' ' * (-len(blob) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for value in tensors.values():
      data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder('<'))
      f.write(data.reshape(-1).view(np.uint8).data)


def split_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  return shards
