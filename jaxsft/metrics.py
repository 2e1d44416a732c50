"""Run outputs and throughput figures: metrics.jsonl, console lines, progress bar, tokens/s and MFU."""

import json
import os
import sys
import time

import jax
import tqdm

from jaxsft.models.transformer import ModelConfig

# Peak dense bf16 FLOP/s per device, by `device.device_kind` prefix. MFU is reported against these.
PEAK_FLOPS = (
    ('TPU v6', 918e12),  # v6e (Trillium): device_kind 'TPU v6 lite'.
    ('TPU v5p', 459e12),
    ('TPU v5 lite', 197e12),  # v5e.
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA H100', 989e12),  # SXM, dense.
    ('NVIDIA A100', 312e12),
)


def is_main_process() -> bool:
  return jax.process_index() == 0


def log(message: str) -> None:
  """One console line from process 0 (through tqdm, so an active progress bar stays intact)."""
  if is_main_process():
    tqdm.tqdm.write(message, file=sys.stderr)


def peak_flops_per_device(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for prefix, flops in PEAK_FLOPS:
    if kind.startswith(prefix):
      return flops
  return None  # CPU and unknown accelerators: no MFU.


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls (the embedding lookup is not one; the unembedding is)."""
  d, h, k, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  attention = d * (h + 2 * k) * hd + h * hd * d
  mlp = 3 * d * f
  return cfg.num_layers * (attention + mlp) + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward = 3 × forward), as in the PaLM paper.

  Weights: 2 FLOPs per matmul parameter forward → 6·N for training.
  Attention: QKᵀ and AV each cost 2·T·H·Dh per token forward over a full T×T score matrix; causal
  masking halves the useful part → 2·T·H·Dh per token per layer forward, 6·L·T·H·Dh for training.
  Rematerialisation is not counted (that is what makes it *model* FLOPs utilisation).
  """
  attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  return 6 * matmul_params(cfg) + attention


class MetricsWriter:
  """Appends one JSON object per logged step to OUTPUT_DIR/metrics.jsonl (process 0 only)."""

  def __init__(self, output_dir: str):
    self.path = os.path.join(output_dir, 'metrics.jsonl')
    self._file = open(self.path, 'a', encoding='utf-8') if is_main_process() else None

  def write(self, row: dict) -> None:
    if self._file is not None:
      self._file.write(json.dumps(row) + '\n')
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class Throughput:
  """Tokens per second and MFU between two logging points."""

  def __init__(self, cfg: ModelConfig, seq_len: int, num_devices: int):
    self.flops_per_token = train_flops_per_token(cfg, seq_len)
    peak = peak_flops_per_device()
    self.peak_total = peak * num_devices if peak else None
    self.reset()

  def reset(self) -> None:
    self.start = time.perf_counter()

  def measure(self, num_loss_tokens: float, num_all_tokens: float) -> dict:
    seconds = max(time.perf_counter() - self.start, 1e-9)
    row = {
        'tokens_per_second': num_loss_tokens / seconds,
        'all_tokens_per_second': num_all_tokens / seconds,
        'mfu': (self.flops_per_token * num_all_tokens / seconds / self.peak_total) if self.peak_total else None,
    }
    self.reset()
    return row
