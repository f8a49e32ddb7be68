"""Run storage (checkpoints, shards, exported blocks) on a local path or any pyarrow.fs URI.

``Storage("outputs/x/storage")``, ``Storage("file:///data/run")``, ``Storage("s3://bucket/run")``,
``Storage("gs://...")``, ``Storage("hdfs://...")``: whatever ``pyarrow.fs.FileSystem.from_uri``
resolves. Writes go to a temporary name and are then moved into place, so a reader never sees
a torn file and a crash never destroys the previous version.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from dblocks.errors import one_line

from .redaction import redact


class StorageError(RuntimeError):
    pass


class CheckpointError(StorageError):
    """A checkpoint that cannot be used (unreadable, wrong content hash, another plan's): names its URI."""


def _why(e: BaseException, limit: int = 240) -> str:
    """An error's message for a one-line report: one line, URL passwords masked, at most ``limit``
    characters (pyarrow's HDFS error lists every libjvm path it tried)."""
    text = redact(one_line(e))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Storage:
    def __init__(self, root: str):
        self.root = root
        try:
            if "://" in root:
                self.fs, self._base = pafs.FileSystem.from_uri(root)
            else:
                self.fs, self._base = pafs.LocalFileSystem(), str(Path(root).resolve())
        except (pa.ArrowException, OSError, ValueError) as e:  # an unknown scheme, a bad URI, no such bucket
            raise StorageError(f"storage.path={redact(root)!r}: {_why(e)}") from None

    def check_writable(self) -> None:
        """Create the root and write, then delete, a probe file there: a root that cannot take the
        run's checkpoints fails at start, in one line naming ``storage.path``."""
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(self._base, recursive=True)
            with self.fs.open_output_stream(self.path(probe)) as f:
                f.write(b"")
            self.fs.delete_file(self.path(probe))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise StorageError(
                f"storage.path={redact(self.root)}: cannot write there ({_why(e)}); choose a path or URI you can write"
            ) from None

    def path(self, rel: str) -> str:
        return f"{self._base.rstrip('/')}/{rel}"

    def uri(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        tmp = f"{final}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if isinstance(self.fs, pafs.LocalFileSystem):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        self.fs.move(tmp, final)

    def read_bytes(self, rel: str) -> bytes:
        if not self.exists(rel):
            raise StorageError(f"{self.uri(rel)} does not exist")
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def put_file(self, local: str | os.PathLike, rel: str) -> None:
        self.write_bytes(rel, Path(local).read_bytes())

    def get_file(self, rel: str, local: str | os.PathLike) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(self.read_bytes(rel))
        return local

    def files(self, rel_dir: str) -> list[str]:
        """The files directly in ``rel_dir`` (relative paths, sorted); [] when it does not exist."""
        selector = pafs.FileSelector(self.path(rel_dir), allow_not_found=True)
        names = [i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        return sorted(f"{rel_dir.rstrip('/')}/{n}" for n in names)

    def move(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (replacing it): atomic on a local file system."""
        self.fs.move(self.path(src), self.path(dst))

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))
