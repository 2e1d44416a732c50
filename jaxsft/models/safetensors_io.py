"""safetensors files without torch: a memory-mapped reader, a writer, and checkpoint sharding.

Our own reader and writer rather than `safetensors.numpy`, so bfloat16 (via ml_dtypes) and a bad file
behave the same on every safetensors version: a malformed header is an InputError naming the file.
"""

import json
import math
import pathlib
import struct

import ml_dtypes
import numpy as np

from jaxsft.errors import InputError

SINGLE_FILE = 'model.safetensors'
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
