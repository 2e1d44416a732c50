"""Run outputs and throughput figures: metrics.jsonl, console lines, tokens/s, MFU, memory (TensorBoard, W&B and
the progress bar: jaxsft/reporting.py).

Model FLOPs of training (what MFU divides by the hardware's peak), written out:

  train FLOPs = 6 · N · tokens  +  12 · H · Dh · Σ_layers Σ_tokens keys(token, layer)

  * tokens: every non-padding token of the step (loss tokens or not: each goes through the whole forward and
    backward pass).
  * N = `matmul_params(cfg)`: the weights that multiply activations. Per layer the q, k, v and o projections
    (d·(H + 2K)·Dh + H·Dh·d) and the SwiGLU MLP (3·d·F); plus the output projection d·V (the lm_head, also
    when tied to the embedding). Not counted: the embedding lookup (a gather, no FLOPs), biases, norms,
    RoPE, softmax and the loss (O(d) or O(V) per token, not O(d²)).
  * 6 = 2 FLOPs (multiply + add) per weight per token forward, 4 backward (the gradient with respect to the
    activations and to the weights), as in Kaplan et al. 2020 / the PaLM paper's appendix B. A LoRA run's frozen
    base has no weight gradient: 4 · N, plus 6 per adapter parameter.
  * Attention scores and values: for each (query, key) pair a layer computes q·k (2·Dh FLOPs per head) and
    adds p·v (2·Dh per head): 4·H·Dh forward, 12·H·Dh for training (×3 as above). keys(token, layer) is the
    number of keys the token actually attends: position + 1 within its own document (causal, the token
    itself included), at most the layer's sliding window. A document of length L thus costs L·(L + 1)/2 pairs
    per layer, the causal half of the L² score matrix: for an unpacked row of T tokens ≈ 6·L·T·H·Dh per
    token over the L layers (PaLM's 12·L·H·Dh·T with causal halving). For packed rows the pairs are counted
    per document (a packed row of many short documents costs much less attention than one long document), and
    padding costs nothing: the figure is the useful work, whatever the kernel spends on masked blocks.
  * Not counted: rematerialisation (recomputing the forward pass is not model work, so MFU < HFU under remat),
    the optimizer update and the collectives.
The training loop counts the attended keys exactly on the devices from the batch's positions and segment ids
(`attended_keys`); `train_flops_per_token` gives the same formula for rows of one full-length document.
"""

import collections
import json
import sys
import time

import jax
import jax.numpy as jnp
import tqdm

from jaxsft import storage
from jaxsft.models.transformer import ModelConfig

# Peak dense bf16 FLOP/s per device, by `device.device_kind` prefix (first match wins: specific names first).
# MFU is reported against these.
PEAK_FLOPS = (
    ('TPU v6', 918e12),  # v6e (Trillium): device_kind 'TPU v6 lite'.
    ('TPU v5p', 459e12),
    ('TPU v5 lite', 197e12),  # v5e.
    ('TPU v5', 459e12),  # v5p reports 'TPU v5'.
    ('TPU v4', 275e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H100 NVL', 835e12),
    ('NVIDIA H100', 989e12),  # SXM ('NVIDIA H100 80GB HBM3'), dense.
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
  """N: the weights that multiply activations (see the module docstring for what is and is not counted)."""
  d, h, k, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  attention = d * (h + 2 * k) * hd + h * hd * d  # q, k, v, o projections.
  mlp = 3 * d * f  # gate, up, down.
  lm_head = d * cfg.vocab_size  # The unembedding is a matmul (tied or not); the embedding lookup is not.
  return cfg.num_layers * (attention + mlp) + lm_head


def layer_windows(cfg: ModelConfig) -> tuple[int | None, ...]:
  """Each layer's sliding window (None: full causal attention)."""
  return tuple(cfg.sliding_windows) if cfg.sliding_windows is not None else (None,) * cfg.num_layers


def causal_pairs(length: int, window: int | None = None) -> int:
  """(query, key) pairs of causal attention over one document of `length` tokens: Σ_p min(p + 1, window)."""
  if window is None or window >= length:
    return length * (length + 1) // 2
  return window * (window + 1) // 2 + (length - window) * window


def attended_keys(positions_BxT: jax.Array, segment_ids_BxT: jax.Array, windows: tuple[int | None, ...]) -> jax.Array:
  """Σ_layers Σ_tokens keys attended, float32 (exact far beyond int32's range; jittable).

  A non-padding token at position p of its document attends min(p + 1, window) keys: positions restart at 0
  in each packed document (the packing contract), and attention never crosses documents. Padding
  (segment 0) counts nothing.
  """
  keys_BxT = positions_BxT.astype(jnp.float32) + 1.0
  real_BxT = (segment_ids_BxT > 0).astype(jnp.float32)
  total = jnp.float32(0.0)
  for window, num_layers in collections.Counter(windows).items():
    capped_BxT = keys_BxT if window is None else jnp.minimum(keys_BxT, float(window))
    total = total + num_layers * jnp.sum(capped_BxT * real_BxT)
  return total


def train_flops(cfg: ModelConfig, num_tokens: float, num_attended_keys: float, *,
                adapter_params: int | None = None) -> float:
  """Model FLOPs of training on `num_tokens` tokens that attend `num_attended_keys` keys over all layers.

  `adapter_params`: a LoRA run's trained parameters; its frozen base gets no weight gradient, so its weights cost
  4 FLOPs a token (forward 2, the activations' gradient 2) and the adapters 6.
  """
  per_token = 6.0 * matmul_params(cfg) if adapter_params is None else 4.0 * matmul_params(cfg) + 6.0 * adapter_params
  return per_token * num_tokens + 12.0 * cfg.num_heads * cfg.head_dim * num_attended_keys


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, adapter_params: int | None = None) -> float:
  """Model FLOPs per training token when every row is one document of `seq_len` tokens.

  6·N + 12·H·Dh·Σ_layers causal_pairs(T, window)/T, i.e. 6·N + 6·L·H·Dh·(T + 1) without sliding windows
  (a LoRA run: 4·N + 6·adapters instead of 6·N, see `train_flops`).
  """
  pairs = sum(causal_pairs(seq_len, window) for window in layer_windows(cfg))
  return train_flops(cfg, seq_len, pairs, adapter_params=adapter_params) / seq_len


def peak_memory_bytes() -> int | None:
  """The allocator's high-water mark since the process started, largest over this process's devices.

  None where the backend reports no memory statistics (CPU: `memory_stats()` is None).
  """
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (backends without the API)
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


class MetricsWriter:
  """Appends one JSON object per logged step to OUTPUT_DIR/metrics.jsonl (process 0 only).

  Locally each row is appended and flushed. A bucket has no appends: there the file's rows are kept here and the
  whole object is uploaded again after each row (one upload is atomic, so a killed run leaves the previous
  version, never a torn line; a few MB per upload even for tens of thousands of rows).
  """

  def __init__(self, output_dir: str):
    self.path = storage.join(output_dir, 'metrics.jsonl')
    self._file = self._text = None
    if not is_main_process():
      return
    if storage.is_remote(self.path):
      self._text = storage.read_text(self.path) if storage.isfile(self.path) else ''
    else:
      self._file = open(self.path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with

  def write(self, row: dict) -> None:
    line = json.dumps(row) + '\n'
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    elif self._text is not None:
      self._text += line
      storage.write_atomically(self.path, self._text)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    self._file = self._text = None


class Throughput:
  """Tokens per second, seconds per step and MFU over the optimizer steps timed since the last `measure`.

  The clock runs from `reset` to `measure`, minus the intervals between `pause` and `resume` (evaluation) and
  the seconds passed to `exclude` (compilations of later steps).
  The caller makes sure the devices have finished the timed steps before `measure` (the metrics fetch does)
  and before `pause`. Each `add_step` may pass the step's attended-key counts as device scalars: they are
  fetched only in `measure`, so timing a step never synchronises. Without them every token is assumed to
  attend as in a full `seq_len` document.
  """

  def __init__(self, cfg: ModelConfig, seq_len: int, num_devices: int, *, peak_flops: float | None = None,
               adapter_params: int | None = None):
    """`adapter_params`: a LoRA run's trained parameters (its FLOPs: `train_flops`)."""
    self.cfg = cfg
    self.seq_len = seq_len
    self.adapter_params = adapter_params
    peak = peak_flops if peak_flops is not None else peak_flops_per_device()
    self.peak_total = peak * num_devices if peak else None
    self.reset()

  def reset(self) -> None:
    self.start = time.perf_counter()
    self._paused_seconds = 0.0
    self._pause_start = None
    self._steps = 0
    self._loss_tokens = self._all_tokens = 0.0
    self._positions = 0.0  # Positions computed, padding included (0: not known).
    self._keys = []  # Attended-key counts (device or host scalars), one list per step.
    self._keys_known = True

  def pause(self) -> None:
    if self._pause_start is None:
      self._pause_start = time.perf_counter()

  def resume(self) -> None:
    if self._pause_start is not None:
      self._paused_seconds += time.perf_counter() - self._pause_start
      self._pause_start = None

  def exclude(self, seconds: float) -> None:
    """Takes `seconds` (a compilation on the host, for a new row width) off the timed interval."""
    self._paused_seconds += seconds

  def add_step(self, num_loss_tokens: float, num_all_tokens: float, keys=None, num_positions: float = 0) -> None:
    """One timed optimizer step: its loss tokens, non-padding tokens, (optionally) attended keys and positions
    computed (padding included)."""
    self._steps += 1
    self._loss_tokens += num_loss_tokens
    self._all_tokens += num_all_tokens
    self._positions += num_positions
    if keys is None:
      self._keys_known = False
    else:
      self._keys.append(keys)

  def seconds(self) -> float:
    self.resume()
    return time.perf_counter() - self.start - self._paused_seconds

  def flops(self) -> float:
    """Model FLOPs of the steps added since the last reset."""
    if self._keys_known:
      keys = sum(float(k) for k in jax.tree.leaves(jax.device_get(self._keys)))
    else:
      keys = self._all_tokens * sum(causal_pairs(self.seq_len, w) for w in layer_windows(self.cfg)) / self.seq_len
    return train_flops(self.cfg, self._all_tokens, keys, adapter_params=self.adapter_params)

  def measure(self) -> dict:
    """tokens_per_second (loss tokens), all_tokens_per_second (non-padding), step_time (s), mfu (non-padding work
    only: padding is not useful FLOPs) and, when the positions are known, non_padding (the share of the computed
    positions that are tokens); then resets.

    With no step timed (the window held only the compilation step) the figures are None.
    """
    seconds = max(self.seconds(), 1e-9)
    if self._steps == 0:
      row = {'tokens_per_second': None, 'all_tokens_per_second': None, 'step_time': None, 'mfu': None}
    else:
      row = {
          'tokens_per_second': self._loss_tokens / seconds,
          'all_tokens_per_second': self._all_tokens / seconds,
          'step_time': seconds / self._steps,
          'mfu': self.flops() / seconds / self.peak_total if self.peak_total else None,
      }
      if self._positions:
        row['non_padding'] = self._all_tokens / self._positions
    self.reset()
    return row
