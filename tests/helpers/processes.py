"""Running several test processes at once (jax.distributed clusters on 127.0.0.1), and their data files."""

import json
import socket
import subprocess


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_all(commands: dict, *, cwd=None) -> dict[str, subprocess.Popen]:
  """Starts every `name: (argv, env)` at once (stdout discarded, stderr captured)."""
  return {name: subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for name, (argv, env) in commands.items()}


def finish_all(procs: dict, *, timeout: int = 300) -> dict[str, tuple[int, str]]:
  """name → (exit status, stderr) of processes started by start_all; kills them all if one hangs."""
  out = {}
  try:
    for name, proc in procs.items():
      err = proc.communicate(timeout=timeout)[1]
      out[name] = (proc.returncode, err)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
  return out


def run_all(commands: dict, *, timeout: int = 240, cwd=None) -> dict[str, str]:
  """Starts every `name: (argv, env)` at once, waits for all; returns name → stderr. Fails naming each process
  that exited non-zero, with the end of its output; kills the rest if one hangs."""
  done = finish_all(start_all(commands, cwd=cwd), timeout=timeout)
  failed = [name for name, (status, _) in done.items() if status != 0]
  assert not failed, '\n'.join(f'--- {n} (exit {status}):\n{err[-3000:]}' for n, (status, err) in done.items())
  return {name: err for name, (_, err) in done.items()}


def write_synthetic_jsonl(path, num_rows: int, seed: int) -> str:
  """`num_rows` synthetic `messages` rows (jaxsft.data.synthetic) as a JSON Lines file."""
  from jaxsft.data import synthetic  # pylint: disable=import-outside-toplevel
  train = synthetic.load(f'synthetic:arithmetic?train={num_rows}&test=0&seed={seed}').train
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(num_rows):
      f.write(json.dumps({'messages': train[i]['messages']}) + '\n')
  return str(path)


def tiny_model_and_splits(root, num_train: int, num_test: int) -> tuple[str, str]:
  """A tiny Qwen2 (hidden 32) and a directory of synthetic train.jsonl / test.jsonl splits: a run's inputs."""
  from tests.helpers import models  # pylint: disable=import-outside-toplevel
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=32, intermediate_size=64)
  data_dir = root / 'data'
  data_dir.mkdir()
  write_synthetic_jsonl(data_dir / 'train.jsonl', num_train, seed=1)
  write_synthetic_jsonl(data_dir / 'test.jsonl', num_test, seed=2)
  return model_dir, str(data_dir)
