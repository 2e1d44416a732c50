"""pyproject.toml's version bounds mean something: every lower bound is a version CI installs and tests.

Lane 1 of `.ci/run` installs at `.ci/floors.txt` (pip constraints: each runtime dependency's lower bound, exactly),
lane 2 at the newest releases. These tests keep the three files in step; they read only our own files, never the
installed libraries' version strings.
"""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_REQUIREMENT = re.compile(r'^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$')


def _name(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def _dependencies() -> dict[str, str]:
  """Runtime dependency -> its version specifier ('' when unbounded)."""
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  deps = {}
  for requirement in project['dependencies']:
    name, _, spec = _REQUIREMENT.match(requirement).groups()
    deps[_name(name)] = spec.replace(' ', '')
  return deps


def _floors() -> dict[str, str]:
  floors = {}
  for line in (ROOT / '.ci' / 'floors.txt').read_text().splitlines():
    line = line.split('#', 1)[0].strip()
    if line:
      name, version = line.split('==')
      floors[_name(name)] = version
  return floors


def test_every_lower_bound_is_pinned_in_the_floors_lane():
  deps, floors = _dependencies(), _floors()
  bounded = {name: spec[2:] for name, spec in deps.items() if spec.startswith('>=')}
  assert bounded, 'pyproject.toml has no lower bounds'
  assert bounded == floors, ('pyproject.toml lower bounds and .ci/floors.txt differ: '
                             f'{set(bounded.items()) ^ set(floors.items())}')


def test_no_upper_bounds_or_pins_without_a_known_break():
  # An upper bound needs a known break; if one is ever added, name the break beside it and list it here.
  known_breaks: dict[str, str] = {}
  for name, spec in _dependencies().items():
    if spec and not spec.startswith('>='):
      assert name in known_breaks, f'{name}{spec}: an upper bound or pin without a known break'
    assert ',' not in spec or name in known_breaks, f'{name}{spec}: an upper bound without a known break'


def test_lane_one_installs_at_the_floors():
  run = (ROOT / '.ci' / 'run').read_text()
  assert "pip install -q -e '.[test]' -c .ci/floors.txt" in run
  assert 'python -m pytest -q' in run
