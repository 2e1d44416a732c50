"""benchmarks/data_throughput.py runs end to end on tiny settings and prints its figures (no speed is asserted)."""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
NUMBER = r'[\d,]+(?:\.\d+)?'


def test_data_throughput_benchmark_prints_figures_and_ratios(tmp_path):
  pytest.importorskip('trl')
  out = tmp_path / 'figures.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'data_throughput.py'), '--num-conversations', '300',
       '--max-length', '4096', '--num-proc', '2', '--json', str(out), '--workdir', str(tmp_path / 'work')],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  text = '\n'.join(lines)
  assert re.search(r'300 conversations written .* median [\d,]+', text)
  assert re.search(rf'^jaxsft cold \(index pass, 2 proc\) +{NUMBER} s +{NUMBER} +{NUMBER} +{NUMBER}%$', text, re.M)
  assert re.search(rf'^jaxsft warm \(index from cache\) +{NUMBER} s', text, re.M)
  assert re.search(rf'^jaxsft loader \(one epoch\) +{NUMBER} +{NUMBER}', text, re.M)
  assert re.search(rf'^TRL _prepare_dataset \(2 proc\) +{NUMBER} s +{NUMBER} +{NUMBER} +{NUMBER}%$', text, re.M)
  assert re.search(rf'^TRL _prepare_dataset \(1 proc, default\) +{NUMBER} s', text, re.M)
  assert 'same non-padding tokens on both sides: yes' in text
  ratio_line = lines[-1]
  assert ratio_line.startswith('ratios jaxsft / TRL (2 proc')
  ratios = dict(re.findall(r'(\w+) (\d+\.\d+)', ratio_line))
  assert set(ratios) == {'cold_first_batch', 'warm_first_batch', 'loader_convs_per_s', 'loader_tokens_per_s',
                         'packing_efficiency', 'cold_first_batch_vs_trl_default'}
  assert all(float(value) > 0 for value in ratios.values())

  figures = json.loads(out.read_text())
  jaxsft, trl = figures['jaxsft'], figures['trl']
  assert jaxsft['conversations'] == 300 and jaxsft['tokens'] == trl['tokens'] > 300
  assert 0.5 < jaxsft['efficiency'] <= 1 and 0.5 < trl['efficiency'] <= 1
  # Whole-dataset best-fit packing needs no more rows than TRL's per-1000-row-batch packing.
  assert jaxsft['rows'] <= trl['rows']
  assert not os.listdir(tmp_path / 'work') or not any(n.startswith('hf_cache') for n in os.listdir(tmp_path / 'work'))
