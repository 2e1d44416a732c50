"""benchmarks/vs_trl.py runs end to end on tiny settings and prints its figures (no speed is asserted)."""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
NUMBER = r'[\d,]+(?:\.\d+)?'
RUNS = ('trl', 'jaxsft', 'trl_packing', 'trl_group_by_length', 'jaxsft_packing', 'jaxsft_padding_free', 'trl_lora',
        'jaxsft_lora')
LABELS = {'trl': 'trl equal settings', 'jaxsft': 'jaxsft equal settings', 'trl_packing': 'trl packing',
          'trl_group_by_length': 'trl group_by_length', 'jaxsft_packing': 'jaxsft packing',
          'jaxsft_padding_free': 'jaxsft padding_free', 'trl_lora': 'trl lora', 'jaxsft_lora': 'jaxsft lora'}


def test_vs_trl_benchmark_prints_figures_and_ratios(tmp_path):
  """Every run trains the requested steps; the table, the best-settings choice, the ratios and the JSON agree."""
  pytest.importorskip('trl')
  pytest.importorskip('peft')
  out = tmp_path / 'figures.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'vs_trl.py'), '--quick', '--parallel', '2', '--json', str(out),
       '--workdir', str(tmp_path / 'work')], capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = proc.stdout
  assert re.search(r'^model: random Qwen2 .* tied embeddings, float32 weights: [\d.]+M parameters$', text, re.M)
  assert re.search(r'^data: 48 conversations, target tokens median \d+, p90 \d+, [\d.]+% over max_length$', text, re.M)
  for name in RUNS:
    assert re.search(rf'^{name}: {NUMBER} tokens/s, first step after {NUMBER} s, peak {NUMBER} MiB', text, re.M), name
    assert re.search(rf'^{LABELS[name]} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}% +{NUMBER} s +{NUMBER} MiB '
                     rf'+{NUMBER} s +{NUMBER} s$', text, re.M), name
  best = re.search(r"^best settings: jaxsft packing against TRL's fastest measured option, (\w+)$", text, re.M)
  assert best and best.group(1) in ('trl', 'trl_packing', 'trl_group_by_length')
  ratio_line = text.strip().splitlines()[-1]
  assert ratio_line.startswith('ratios jaxsft / TRL')
  ratios = dict(re.findall(r'(\w+) (\d+\.\d+)', ratio_line))
  assert set(ratios) == {f'{p}_{k}' for p in ('equal', 'padding_free', 'best', 'lora')
                         for k in ('tokens_per_s', 'tokens_per_cpu_s', 'first_step', 'peak_memory')}
  assert all(float(v) > 0 for v in ratios.values())

  figures = json.loads(out.read_text())
  assert figures['best_trl'] == best.group(1)
  rates = {name: figures[name]['tokens_per_s'] for name in ('trl', 'trl_packing', 'trl_group_by_length')}
  assert rates[best.group(1)] == max(rates.values())  # The best TRL option is the fastest one measured.
  max_length, batch = figures['meta']['max_length'], figures['meta']['batch_size']
  for name in RUNS:
    run = figures[name]
    steps = run['steps']
    assert [s['step'] for s in steps] == [1, 2, 3]
    assert all(b['time'] >= a['time'] and b['tokens'] > a['tokens'] for a, b in zip(steps, steps[1:]))
    # No step computes more non-padding tokens than positions, nor more positions than batch x max_length.
    for a, b in zip([{'tokens': 0, 'positions': 0}] + steps, steps):
      assert 0 < b['tokens'] - a['tokens'] <= b['positions'] - a['positions'] <= batch * max_length
    assert run['peak_mib'] > 0 and run['first_step_s'] > 0
    # Compilations within the timed steps are kept out of the rate (none here: max_length 128 is one width).
    assert run['compile_s'] == 0 and run['tokens_per_s'] == run['tokens_per_s_with_compile']
  # jaxsft pads unpacked rows to max_length; TRL's padding-free packing computes no padding at all.
  assert figures['jaxsft']['steps'][-1]['positions'] == 3 * batch * max_length
  assert figures['trl_packing']['padding_efficiency'] == 1.0
  assert figures['jaxsft_packing']['padding_efficiency'] > figures['jaxsft']['padding_efficiency']
  # Padding-free: the equal-settings conversations (the same loss tokens per step), in fewer computed rows.
  free = figures['jaxsft_padding_free']
  assert free['settings']['batch_size'] * free['settings']['accumulation'] == batch
  assert free['steps'][-1]['positions'] < figures['jaxsft']['steps'][-1]['positions']
  assert free['padding_efficiency'] > figures['jaxsft']['padding_efficiency']
  assert set(os.listdir(tmp_path / 'work' / 'jaxsft')) == {'log.txt', 'result.json'}  # Run outputs are removed.
