"""Runs a module as `python -m MODULE ARGS...` would, in an interpreter where torch is not installed (a TPU VM).

  python -m tests.helpers.no_torch jaxsft.generate --model DIR --prompt hi

`importlib.util.find_spec('torch')` (transformers' check) answers None and `import torch` fails, as without the
package; the rest of the environment is this one.
"""

import importlib.abc
import importlib.util
import runpy
import sys


def _is_torch(name: str) -> bool:
  return name == 'torch' or name.startswith('torch.')


class _NoTorch(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):  # pylint: disable=unused-argument
    if _is_torch(name):
      raise ModuleNotFoundError(f"No module named '{name}'", name=name)
    return None


def hide_torch() -> None:
  find_spec = importlib.util.find_spec
  importlib.util.find_spec = lambda name, package=None: None if _is_torch(name) else find_spec(name, package)
  sys.meta_path.insert(0, _NoTorch())


if __name__ == '__main__':
  hide_torch()
  module, sys.argv = sys.argv[1], sys.argv[1:]
  runpy.run_module(module, run_name='__main__', alter_sys=True)
