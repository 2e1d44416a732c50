"""benchmarks/checkpoint_overlap.py runs end to end on small settings and prints its figures (no speed asserted)."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
SECONDS = r'-?\d+\.\d{3} s'


def test_checkpoint_benchmark_prints_its_figures(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'checkpoint_overlap.py'), '--steps', '6', '--save-every', '3',
       '--batch', '4', '--length', '32', '--workdir', str(tmp_path), '--gcs-emulator'],
      capture_output=True, text=True, timeout=300, check=False, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  assert re.search(r'^model: 0\.86M parameters \(hidden 128, 4 layers\), checkpoint [\d.]+ MiB', text, re.M), text
  assert re.search(rf'^train, no saves +{SECONDS}', text, re.M), text
  # The same figures for local disk, then for a bucket on fake-gcs-server, then their ratios.
  sections = re.split(r'^--- checkpoints on ', text, flags=re.M)[1:]
  assert [s.splitlines()[0] for s in sections] == ['local disk', 'gs:// (fake-gcs-server on 127.0.0.1)'], text
  for section in sections:
    for label in (r'sync save \(save \+ wait\)', 'blocking part of a save', r'train, async save every 3',
                  'overhead per async save', 'checksums, per save'):
      assert re.search(rf'^{label} +{SECONDS}', section, re.M), (label, section)
    assert re.search(r'hidden by training: -?\d+%$', section, re.M)
  assert re.search(r'^gs:// / local disk +sync save [\d.]+×, blocking [\d.]+×, checksums [\d.]+×, verify [\d.]+×$',
                   text, re.M), text
  assert sorted(os.listdir(tmp_path / 'async')) == ['103', '106']  # The async loop's checkpoints are complete.
