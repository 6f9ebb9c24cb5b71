"""Where error files and exports go: a local path or an ``s3://bucket/key`` URI.

S3 writes go to a local temporary file first and are uploaded on close, so a crash never
leaves half an object behind. The S3 endpoint comes from the usual AWS settings
(``AWS_ENDPOINT_URL`` for S3-compatible stores and moto), credentials from the environment.
``s3://`` needs the ``s3`` extra (boto3); S3 failures are raised as :class:`StorageError`, an
``OSError``, so callers handle a missing object like a missing file.

A local path that cannot be written (a folder on the way is a file, a system folder such as
``/proc``, a folder where the file should be) is a mistake in the project, not a bug: it is
raised as :class:`PathError`, both an ``OSError`` and a ``ReverseEtlError``, whose message
says which part of the path is wrong.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from reverse_etl.errors import ReverseEtlError
from reverse_etl.extras import requires


class StorageError(OSError):
    """An S3 request failed (missing object or bucket, access denied, ...)."""


class PathError(StorageError, ReverseEtlError):
    """A local file cannot be created where its path says: the message names the part of the
    path at fault. An ``OSError`` for callers that handle file errors, and a
    ``ReverseEtlError`` so that a run fails with it, cleanly, before it reads a row."""


def is_s3(target: str) -> bool:
    return target.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_s3(base) else str(Path(base) / name)


@contextmanager
def open_text_for_write(target: str) -> Iterator[IO[str]]:
    """Open ``target`` for writing CSV text (newline='' as the csv module wants), creating its
    folder. A local path that cannot be written raises :class:`PathError`."""
    if not is_s3(target):
        path = Path(target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = path.open("w", newline="", encoding="utf-8")
        except OSError as exc:
            raise PathError(f"cannot write {path}: {path_problem(path, exc)}") from exc
        with fh:  # the block's own errors (a full disk while writing) pass through as they are
            yield fh
        return
    bucket, key = split_s3(target)
    fd, tmp = tempfile.mkstemp(suffix=".csv")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            try:
                yield fh
            finally:
                fh.flush()
                # Uploaded even when the block failed: the rows written so far (a failed run's
                # rejected rows) are exactly what the user needs to see.
                _s3("upload_file", bucket, key, tmp)
    finally:
        os.unlink(tmp)


@contextmanager
def open_text_for_read(source: str) -> Iterator[IO[str]]:
    if not is_s3(source):
        with Path(source).open(newline="", encoding="utf-8-sig") as fh:
            yield fh
        return
    bucket, key = split_s3(source)
    fd, tmp = tempfile.mkstemp(suffix=".csv")
    os.close(fd)
    try:
        _s3("download_file", bucket, key, tmp)
        with open(tmp, newline="", encoding="utf-8-sig") as fh:
            yield fh
    finally:
        os.unlink(tmp)


def local_copy_path(source: str) -> str:
    """A local file path for ``source`` (downloads s3 objects); caller deletes it if s3."""
    if not is_s3(source):
        if not Path(source).is_file():
            raise FileNotFoundError(f"{source}: no such file")
        return source
    bucket, key = split_s3(source)
    fd, tmp = tempfile.mkstemp(suffix=Path(key).suffix or ".csv")
    os.close(fd)
    try:
        _s3("download_file", bucket, key, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def path_problem(path: Path, exc: OSError | None = None) -> str | None:
    """Why the file ``path`` cannot be created or written, in words that say what to fix:
    "/p/afile is a file, not a folder", "/p/out is a folder, not a file", ... ``exc`` is the
    error the attempt raised, if any (its text is the answer when the path looks fine); without
    one, None when nothing is visibly wrong."""
    blocker = _first_existing(path)
    if blocker is not None and blocker != path and not blocker.is_dir():
        return f"{blocker} is {'a file, not a folder' if blocker.is_file() else 'not a folder'}"
    if blocker is None or (blocker != path and blocker != path.parent):
        missing = path.parent if blocker is None else _child_towards(blocker, path)
        if exc is None:  # not tried: a sqlite file's absolute path (its folders are not made)
            return f"folder {missing} does not exist"
        return f"folder {missing} cannot be created: {_cause(exc)}"  # e.g. under /proc
    if path.is_dir():
        return f"{path} is a folder, not a file"
    if exc is not None and exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write {path if path.exists() else f'in {path.parent}'}"
    if exc is not None and exc.errno == errno.EROFS:
        return f"{path.parent} is on a read-only file system"
    return _cause(exc) if exc is not None else None


def _first_existing(path: Path) -> Path | None:
    """``path`` or its nearest ancestor that exists (as a file or a folder)."""
    for candidate in (path, *path.parents):
        try:
            candidate.lstat()
        except OSError:
            continue
        return candidate
    return None


def _child_towards(ancestor: Path, path: Path) -> Path:
    """The folder right below ``ancestor`` on the way to ``path``."""
    return ancestor / path.relative_to(ancestor).parts[0]


def _cause(exc: OSError) -> str:
    return (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")


def upload(local: str, target: str) -> None:
    bucket, key = split_s3(target)
    _s3("upload_file", bucket, key, local)


def _s3(method: str, bucket: str, key: str, local: str) -> None:
    """Upload ``local`` to, or download it from, ``s3://bucket/key``; botocore's errors become
    :class:`StorageError`."""
    with requires("s3", "s3:// error files and exports"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3")
    try:
        if method == "upload_file":
            client.upload_file(local, bucket, key)
        else:
            client.download_file(bucket, key, local)
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"s3://{bucket}/{key}: {exc}") from exc
