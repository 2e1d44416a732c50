"""Shared pytest fixtures."""

import atexit
import importlib.util
import os
import pathlib
import shutil
import signal
import tempfile

import numpy as np
import pytest

from tests.helpers import gcs as gcs_helpers

# A suite started with SIGINT ignored (under nohup, or as `cmd &` from a script) would pass that on: Python then
# installs no KeyboardInterrupt handler, and jaxsft rightly leaves an ignored SIGINT ignored, so the Ctrl-C tests
# would test nohup instead. The tests play a terminal user's process: restore Python's default (subprocesses then
# start with SIGINT's default action).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

# The data index cache of every run in the test session (also of subprocesses, which inherit the
# environment) goes to a fresh directory: no test reads what an earlier session left in ~/.cache.
os.environ['JAXSFT_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxsft-test-cache-')
atexit.register(shutil.rmtree, os.environ['JAXSFT_CACHE_DIR'], ignore_errors=True)

# No test talks to real Cloud Storage or runs on GCE: the variables that gcsfs and google-auth read on import (their
# probes of the bucket type and of the metadata server) are set before anything imports them (tests/helpers/gcs.py).
os.environ.update(gcs_helpers.IMPORT_TIME_ENV)

# XLA's compiled programs, likewise, go to a fresh directory for the session (jax's persistent compilation cache,
# every program whatever its size or compile time), in this process and in subprocesses: the many training runs
# that take the same step (tests/test_checkpoint.py alone has a dozen) compile it once, not once each (on 2 CPU
# cores, compiling a tiny model's step takes ~15 s of a ~20 s run). A cached program is the one compiled, so
# bitwise comparisons between runs hold as before. JAXSFT_TEST_COMPILATION_CACHE=0 turns it off.
if os.environ.get('JAXSFT_TEST_COMPILATION_CACHE', '1') != '0':
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxsft-test-xla-cache-')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  import jax  # pylint: disable=wrong-import-position,wrong-import-order  (jax reads those variables on import only)
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
else:
  os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)

# ----------------------------------------------------------------------------------------------------------
# Without torch (TPU VMs; the Python 3.12 lane, where torch is a CUDA build only): a test that needs torch, TRL or
# accelerate (the references: transformers models, SFTTrainer) is skipped, naming the package, instead of
# failing on the import. tests/test_golden.py checks jaxsft against their stored results there.

_REFERENCE_PACKAGES = ('torch', 'trl', 'accelerate')
_TORCH_MISSING = importlib.util.find_spec('torch') is None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  error = call.excinfo.value if call.excinfo is not None else None
  missing = None
  if _TORCH_MISSING and isinstance(error, ImportError):
    missing = (error.name or '').split('.')[0]
    if missing not in _REFERENCE_PACKAGES:  # transformers' torch models raise ImportError("... PyTorch ...").
      missing = 'torch' if 'PyTorch' in str(error) else None
  if missing:
    report.outcome = 'skipped'
    report.longrepr = (str(item.path), item.location[1] or 0, f'Skipped: needs {missing} (not installed)')


# ----------------------------------------------------------------------------------------------------------
# Tiny Hugging Face models (tests/test_model.py, tests/test_hf.py).
#
# Random transformers models small enough for CPU, with weights drawn at O(1) scale (unit-variance
# embeddings, 1/sqrt(fan_in) kernels, non-zero biases, norm scales around 1) so attention patterns, biases and
# RoPE all move the logits well past the 1e-4 comparison tolerance; transformers' own init (std 0.02, zero
# biases, unit norms) would leave them nearly invisible.

TINY_VOCAB = 300
_TINY_BASE = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# name → (transformers config class, overrides of _TINY_BASE).
TINY_HF_CONFIGS = {
    'qwen2': ('Qwen2Config', {}),
    'qwen2_sliding': ('Qwen2Config', dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=1)),
    'qwen3': ('Qwen3Config', dict(head_dim=24, rope_parameters={'rope_type': 'default', 'rope_theta': 1e6})),
    'qwen3_yarn': ('Qwen3Config', dict(head_dim=16, rope_parameters={
        'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0, 'original_max_position_embeddings': 16})),
    'llama3': ('LlamaConfig', dict(attention_bias=True, mlp_bias=True, rope_parameters={
        'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
        'high_freq_factor': 4.0, 'original_max_position_embeddings': 32})),
    'mistral': ('MistralConfig', dict(sliding_window=5)),
    'llama_tied': ('LlamaConfig', dict(tie_word_embeddings=True)),
}


class TinyHF:
  """Builds, saves and runs tiny random transformers models."""

  configs = TINY_HF_CONFIGS
  vocab_size = TINY_VOCAB

  def __init__(self, root: pathlib.Path):
    self.root = root
    self._count = 0

  def model(self, name: str, seed: int = 0, **overrides):
    """A float32 eval-mode `*ForCausalLM` with eager attention and O(1) random weights."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    cls_name, kwargs = TINY_HF_CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**_TINY_BASE, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager')
    model = model.to(torch.float32).eval()
    with torch.no_grad():
      for pname, p in model.named_parameters():
        if 'norm' in pname:
          p.copy_(1.0 + 0.3 * torch.randn_like(p))
        elif pname.endswith('bias'):
          p.copy_(0.5 * torch.randn_like(p))
        elif 'embed_tokens' in pname:
          p.normal_(0.0, 1.0)
        else:
          p.normal_(0.0, p.shape[1] ** -0.5)
    return model

  def save(self, model, **save_kwargs) -> pathlib.Path:
    """`model.save_pretrained` into a fresh directory."""
    self._count += 1
    path = self.root / f'hf{self._count}'
    model.save_pretrained(path, **save_kwargs)
    return path

  @staticmethod
  def batch(padding: str, *, batch: int = 2, length: int = 12, seed: int = 0):
    """(tokens, mask, positions) int arrays [B, T] with `padding` ('right' | 'left') of 3 and 5 tokens.

    positions = cumsum(mask) - 1 clipped at 0, the convention both models get.
    """
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, TINY_VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for row, pad in zip(range(batch), (3, 5, 0, 7)):
      if pad:
        if padding == 'right':
          mask[row, -pad:] = 0
        else:
          mask[row, :pad] = 0
    tokens = np.where(mask > 0, tokens, 0)
    positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
    return tokens, mask, positions

  @staticmethod
  def logits(model, tokens, mask=None, positions=None) -> np.ndarray:
    """transformers' float32 logits [B, T, V] with the attention mask and explicit position ids."""
    import torch  # pylint: disable=import-outside-toplevel
    # use_cache=False: with a cache, transformers ignores packed (restarting) position_ids.
    kwargs = {'input_ids': torch.as_tensor(np.asarray(tokens)), 'use_cache': False}
    if mask is not None:
      kwargs['attention_mask'] = torch.as_tensor(np.asarray(mask))
    if positions is not None:
      kwargs['position_ids'] = torch.as_tensor(np.asarray(positions))
    with torch.no_grad():
      return model(**kwargs).logits.float().numpy()


@pytest.fixture(scope='session')
def tiny_hf(tmp_path_factory) -> TinyHF:
  return TinyHF(tmp_path_factory.mktemp('tiny_hf'))


