"""Every path omnijax reads or writes, local or in a bucket: `etils.epath.Path`, as orbax and grain
use. A URL (`gs://bucket/run`, any fsspec protocol) stays a URL; a local path is made absolute.

`pathlib.Path("gs://bucket/run")` is `gs:/bucket/run`, a local folder: nothing in omnijax may
build a run's paths with pathlib or os.path.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import fsspec
from etils import epath

from omnijax.errors import ConfigError

PathLike = str | os.PathLike

# Other processes (the run's other hosts, the next launch) and tensorstore (orbax's arrays)
# write to the bucket behind gcsfs's back: a cached listing would hide their objects.
fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


def is_url(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """The epath.Path of a local path (absolute) or a URL (unchanged)."""
  if isinstance(p, epath.Path) and is_url(p):
    return p
  s = os.fspath(p)
  return epath.Path(s if is_url(s) else os.path.abspath(s))


def local(p: PathLike, what: str, hint: str) -> pathlib.Path:
  """A path that must be on this machine's file system (a memory map, a subprocess's input):
  a URL is a ConfigError that names `what` and says what to do (`hint`)."""
  if is_url(p):
    raise ConfigError(f"{what}={os.fspath(p)!r} must be a local path: {hint}")
  return pathlib.Path(os.fspath(p)).absolute()


def check_reachable(p: PathLike, what: str) -> epath.Path:
  """`p` as an epath.Path; for a URL, first checks that its bucket answers, so a wrong bucket
  name or missing credentials fail before anything compiles."""
  out = path(p)
  if not is_url(out):
    return out
  scheme, _, rest = os.fspath(out).partition("://")
  bucket = epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")
  try:
    ok = bucket.exists()
  except Exception as e:  # any client error means the same to the user
    raise ConfigError(
      f"{what}={os.fspath(p)!r}: cannot reach {bucket} ({type(e).__name__}: {e}); check the "
      "bucket name and the credentials (gcloud auth application-default login, or the VM's "
      "service account)."
    ) from e
  if not ok:
    raise ConfigError(
      f"{what}={os.fspath(p)!r}: the bucket {bucket} does not exist or is not visible with "
      "these credentials; create it or fix the name."
    )
  return out


def staged(p: PathLike) -> pathlib.Path:
  """Where a writer that only knows local files (the profiler, TensorBoard's) writes what
  belongs at `p`: `p` itself when local, else a fresh local directory that `sync` / `upload`
  copy up."""
  return local(p, "", "") if not is_url(p) else pathlib.Path(tempfile.mkdtemp(prefix="omnijax-"))


def sync(stage: pathlib.Path, p: PathLike) -> None:
  """Copies a `staged` directory's files to `p` (a URL); nothing when local."""
  if not is_url(p):
    return
  for f in stage.rglob("*"):
    if f.is_file():
      target = path(p) / f.relative_to(stage).as_posix()
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(f.read_bytes())


def upload(stage: pathlib.Path, p: PathLike) -> None:
  """`sync`, then removes the stage; nothing when local."""
  if is_url(p):
    sync(stage, p)
    shutil.rmtree(stage)
