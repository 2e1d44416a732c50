"""The shape of the code (DESIGN.md "Layout"): small modules, no import cycles, config errors before jax.

* No module of jaxsft/ over 500 lines; trainer.py (`run`: validate → data → state → step → loop → export) at
  most 250.
* No import cycle between jaxsft's modules, counting imports inside functions (an import inside a function
  is still a dependency: it only hides the cycle until that function runs).
* A config typo is reported without importing jax (or flax, optax, orbax): a few hundred milliseconds, not the
  seconds those take to import.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'jaxsft')
MAX_LINES = 500
LIMITS = {'trainer.py': 250}


def _modules() -> dict[str, str]:
  """{dotted module name: file path} of every module of the jaxsft package."""
  out = {}
  for parent, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(parent, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        out[rel.removesuffix('.__init__')] = path
  return out


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
  """jaxsft modules that `module` imports anywhere in its file (top level or inside functions)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
      names = [f'{base}.{alias.name}' for alias in node.names] + [base]
    else:
      continue
    for name in names:
      while name and name not in modules:  # `from jaxsft.data import sources` names a module; `import a.b.c`...
        name = name.rpartition('.')[0]
      if name and name != module and name != 'jaxsft':
        found.add(name)
  return found


def test_no_module_is_over_its_line_limit():
  too_long = {}
  for module, path in _modules().items():
    with open(path, encoding='utf-8') as f:
      lines = sum(1 for _ in f)
    limit = LIMITS.get(os.path.basename(path) if os.path.dirname(path) == PACKAGE else '', MAX_LINES)
    if lines > limit:
      too_long[module] = (lines, limit)
  assert not too_long, too_long


def test_no_import_cycles_counting_imports_inside_functions():
  modules = _modules()
  graph = {m: _imports(m, p, modules) for m, p in modules.items()}
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = 'active'
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 'active':
        cycles.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, stack)
    stack.pop()
    state[node] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [])
  assert not cycles, '\n'.join(' -> '.join(c) for c in cycles)


@pytest.mark.parametrize('entry', ['jaxsft.train', 'jaxsft.dryrun'])
def test_a_config_typo_is_reported_without_importing_jax(tmp_path, entry):
  """A `jax` (and flax, optax, orbax) that fails to import, first on the path: the typo's one line still comes."""
  for name in ('jax', 'flax', 'optax', 'orbax'):
    (tmp_path / name).mkdir()
    (tmp_path / name / '__init__.py').write_text(f'raise ImportError("{name} imported for a config typo")\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
  proc = subprocess.run([sys.executable, '-m', entry, '--config', 'configs/tiny.py', '--config.learnig_rate=1e-3'],
                        cwd=ROOT, env=env, text=True, capture_output=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
      'error: unknown config field learnig_rate (did you mean learning_rate?)'], proc.stderr[-3000:]
