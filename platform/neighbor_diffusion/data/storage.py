"""Where the data jobs read and write: a local folder, or a URI of a filesystem pyarrow opens
(`s3://bucket/prefix`, `gs://bucket/prefix`, `hdfs://host:port/path`, `file:///abs/path`): the
filesystems Ray Data itself reads and writes with. On a cluster whose nodes share no disk, the
data goes to object storage: `--data.root s3://bucket/nd` for jobs/prepare_data.py and jobs/train.py
(and a training run's own files under `--train.storage_path s3://...`: its checkpoints, which Ray Train
writes, and its MLflow run id, read when it resumes).

Credentials and endpoints come from the filesystem's usual settings: for S3 the AWS environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; AWS_ENDPOINT_URL for an S3-compatible
store such as MinIO) or the URI's query (`s3://bucket/nd?endpoint_override=host:9000&scheme=http`).
A bucket must exist: nothing here creates one.

`location(...)` gives a `pathlib.Path` for a local path, as before, and a `Location` for a URI: a
file or folder with the part of Path's interface the data jobs use (`/`, `name`, `exists`, `is_file`,
`is_dir`, `mkdir`, `read_*`, `write_*`, `unlink`), so that code written for a Path takes either.
Ray Data and pyarrow calls take `ray_path(...)` with `filesystem(...)`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from neighbor_diffusion.config import ConfigError


class Location:
    """A file or folder on a pyarrow filesystem (one named by a URI; see `location`)."""

    def __init__(self, fs: pafs.FileSystem, path: str, prefix: str, query: str = ""):
        self.fs, self.path, self._prefix, self._query = fs, path.rstrip("/"), prefix, query

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path}/{name}", self._prefix, self._query)

    def __str__(self) -> str:  # the URI again, query included: location(str(loc)) is the same place
        return self._prefix + self.path + (f"?{self._query}" if self._query else "")

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.fs.create_dir(self.path, recursive=parents)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self) -> None:
        self.fs.delete_file(self.path)


def is_uri(where: str | Path | Location) -> bool:
    """Whether `where` names a place on a filesystem URI (`scheme://...`) rather than a local path."""
    return isinstance(where, Location) or (not isinstance(where, Path) and "://" in str(where))


def location(where: str | Path | Location, field: str = "path") -> Path | Location:
    """A local path as a Path; a filesystem URI (`scheme://...`) as a Location. `field` names the
    setting in the error when pyarrow cannot open the URI (no such filesystem, no region for the bucket)."""
    if isinstance(where, (Path, Location)):
        return where
    where = str(where)
    if not is_uri(where):
        return Path(where)
    base, _, query = where.partition("?")
    try:
        fs, path = pafs.FileSystem.from_uri(where)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise ConfigError(f"{field}={where!r}: cannot open it ({e})") from None
    path, stripped = path.rstrip("/"), base.rstrip("/")
    # the URI less the filesystem's path: "s3://" for s3://bucket/key, "hdfs://host:8020" for hdfs://host:8020/p
    prefix = stripped[: -len(path)] if path and stripped.endswith(path) else base[: base.index("://") + 3]
    return Location(fs, path, prefix, query)


def filesystem(where: str | Path | Location) -> pafs.FileSystem | None:
    """The filesystem to give Ray Data / pyarrow with `ray_path(where)`; None (their default) for a local path."""
    where = location(where)
    return where.fs if isinstance(where, Location) else None


def ray_path(where: str | Path | Location) -> str:
    """`where` as Ray Data and pyarrow take it together with `filesystem(where)`."""
    where = location(where)
    return where.path if isinstance(where, Location) else str(where)


def files(folder: str | Path | Location, suffix: str) -> list[str]:
    """Paths (as `ray_path` gives them) of the files ending in `suffix` anywhere under `folder`, sorted;
    none if the folder does not exist."""
    folder = location(folder)
    if isinstance(folder, Path):
        return sorted(str(p) for p in folder.rglob(f"*{suffix}") if p.is_file())
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def children(folder: str | Path | Location) -> list[Path | Location]:
    """What `folder` holds directly (files and folders), sorted; none if it does not exist."""
    folder = location(folder)
    if isinstance(folder, Path):
        return sorted(folder.iterdir()) if folder.is_dir() else []
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    return sorted((folder / i.base_name for i in infos), key=str)


def remove_files(folder: str | Path | Location, suffix: str = "") -> None:
    """Delete the files ending in `suffix` under `folder` (stale shards that a new write would sit beside)."""
    folder = location(folder)
    fs = filesystem(folder)
    for f in files(folder, suffix):
        if fs is None:
            Path(f).unlink()
        else:
            fs.delete_file(f)


def read_table(where: str | Path | Location, **kwargs) -> pa.Table:
    where = location(where)
    return pq.read_table(ray_path(where), filesystem=filesystem(where), **kwargs)


def write_table(table: pa.Table, where: str | Path | Location) -> None:
    where = location(where)
    pq.write_table(table, ray_path(where), filesystem=filesystem(where))
