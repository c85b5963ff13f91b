"""The local-disk blob store: the embedded default, shared by every gunicorn worker of a host.

On-disk layout of `LocalBlobStore` (suffix-free for callers): blob `a/b/c` is the file
`<root>/a.d/b.d/c.blob`. The suffixes keep a directory and a file from ever sharing a path, so
`a` and `a/b` can both exist, as in GCS; in-flight writes are `.*.tmp` files, never listed. Each
file starts with a small header (magic `FCPB`, version, gzip flag, SHA-256 of the uncompressed
content, content type) followed by the stored bytes, so metadata and content are replaced
together by one atomic `os.replace`.
"""

import builtins
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Final, TypeVar

from fcp_server import fault_points
from fcp_server.storage.blob_encoding import check_max_bytes, encode_content
from fcp_server.storage.blob_names import check_content_type, validate_name, validate_prefix
from fcp_server.storage.blobs import (
    DEFAULT_CONTENT_TYPE,
    BlobBackendError,
    BlobContent,
    BlobCorrupt,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    InvalidBlobStoreUrl,
    RawBlob,
)
from fcp_server.storage.read_buffers import ReadBuffer

_Data = TypeVar("_Data", bytes, memoryview)
_MAGIC: Final = b"FCPB"
_VERSION: Final = 1
_FLAG_GZIP: Final = 1
# magic, version, flags, content-type length, SHA-256 of the uncompressed content.
_HEADER: Final = struct.Struct(">4sBBB32s")
_DIR_SUFFIX: Final = ".d"
_FILE_SUFFIX: Final = ".blob"


def _etag(sha256_hex: str, gzipped: bool) -> str:
    # Stored bytes are a pure function of (content, gzip flag) because gzip uses mtime 0.
    return sha256_hex + ("-gz" if gzipped else "")


def _fsync_dir(path: Path) -> None:
    # Makes a new, renamed or removed entry of `path` durable; some file systems refuse fsync
    # on a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """Creates `directory` and its missing ancestors durably; one stat when it already exists."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            continue  # a concurrent writer made it and fsyncs its parent itself
        # A new entry is only durable once its parent is fsynced; without this a crash could
        # lose the whole chain, and with it a blob whose own directory was fsynced.
        _fsync_dir(new.parent)


def _replace(tmp: str, path: Path) -> bool:
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def _link_if_absent(tmp: str, path: Path) -> bool:
    # The link fails atomically if the name exists, so exactly one concurrent writer wins.
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


class LocalBlobStore(BlobStore):
    """Blobs as files under one root directory; safe to share between processes of one host.

    Writes go to a temporary file in the target directory, are fsynced and then renamed over
    the target, so a crash or error mid-write leaves the old blob (or none) in place.
    `put_if_absent` hard-links the finished temporary file, which fails atomically if the
    name exists. Files are created mode 0600: uploads are private to the server's user.
    Empty directories left by `delete` are kept (removing them would race concurrent writers).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Opens (creating if needed) the store rooted at the absolute directory `root`."""
        path = Path(root)
        if not path.is_absolute():
            raise InvalidBlobStoreUrl(f"local blob store root {str(path)!r} must be absolute")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BlobBackendError(f"cannot create blob directory {str(path)!r}: {e}") from e
        self._root = path

    @property
    def root(self) -> Path:
        """The directory holding the blobs."""
        return self._root

    def _path(self, name: str) -> Path:
        *dirs, leaf = validate_name(name).split("/")
        return self._root.joinpath(*(d + _DIR_SUFFIX for d in dirs), leaf + _FILE_SUFFIX)

    def _write_temp(self, directory: Path, header: bytes, stored: BlobContent) -> str:
        _make_dirs(directory)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.flush()
                fault_points.hit("blob.partial_write")  # a crash here leaves a half temp file
                f.write(stored)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def _prepare(
        self, name: str, data: BlobContent, gzip: bool, content_type: str, sha256: str | None
    ) -> tuple[Path, bytes, BlobContent, BlobInfo]:
        path = self._path(name)
        ctype = check_content_type(content_type)
        stored, digest = encode_content(data, gzip=gzip, sha256=sha256)
        ct_bytes = ctype.encode("ascii")
        flags = _FLAG_GZIP if gzip else 0
        header = _HEADER.pack(_MAGIC, _VERSION, flags, len(ct_bytes), bytes.fromhex(digest))
        info = BlobInfo(name, len(stored), gzip, ctype, _etag(digest, gzip), digest)
        return path, header + ct_bytes, stored, info

    def put(
        self,
        name: str,
        data: BlobContent,
        *,
        gzip: bool = False,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> BlobInfo:
        """See `BlobStore.put`."""
        path, header, stored, info = self._prepare(name, data, gzip, content_type, sha256)
        self._write(name, path, header, stored, _replace)
        return info

    def put_if_absent(
        self,
        name: str,
        data: BlobContent,
        *,
        gzip: bool = False,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> bool:
        """See `BlobStore.put_if_absent`."""
        path, header, stored, _ = self._prepare(name, data, gzip, content_type, sha256)
        if path.exists():  # Cheap early exit for retried uploads; the link below decides.
            return False
        return self._write(name, path, header, stored, _link_if_absent)

    def _write(
        self,
        name: str,
        path: Path,
        header: bytes,
        stored: BlobContent,
        publish: Callable[[str, Path], bool],
    ) -> bool:
        """Writes a temporary file next to `path` and lets `publish` move it there.

        `publish` removes the temporary file whenever it is not moved into place, and returns
        whether the blob was written; only then is the directory entry made durable.
        """
        try:
            tmp = self._write_temp(path.parent, header, stored)
            published = publish(tmp, path)
        except OSError as e:
            raise BlobBackendError(f"cannot write blob {name!r}: {e}") from e
        if published:
            _fsync_dir(path.parent)
        return published

    def _read_header(self, f: BinaryIO, name: str) -> tuple[BlobInfo, int]:
        fixed = f.read(_HEADER.size)
        if len(fixed) == _HEADER.size:
            magic, version, flags, ct_len, digest = _HEADER.unpack(fixed)
            ct = f.read(ct_len)
            if magic == _MAGIC and version == _VERSION and len(ct) == ct_len:
                header_len = _HEADER.size + ct_len
                size = os.fstat(f.fileno()).st_size - header_len
                gz = bool(flags & _FLAG_GZIP)
                sha = digest.hex()
                info = BlobInfo(name, size, gz, ct.decode("ascii", "replace"), _etag(sha, gz), sha)
                return info, header_len
        raise BlobCorrupt(f"blob {name!r} has a damaged header in {str(self._root)!r}")

    def _open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise BlobNotFound(f"no blob named {name!r}") from e
        except OSError as e:
            raise BlobBackendError(f"cannot read blob {name!r}: {e}") from e

    def get_raw(self, name: str, *, max_bytes: int | None = None) -> RawBlob:
        """See `BlobStore.get_raw`."""
        return RawBlob(*self._read(name, max_bytes, lambda f, _: f.read()))

    def get_raw_into(
        self, name: str, buffer: ReadBuffer, *, max_bytes: int | None = None
    ) -> tuple[BlobInfo, bytes | memoryview]:
        """See `BlobStore.get_raw_into`: the stored bytes are read straight into `buffer`."""
        info, view = self._read(name, max_bytes, lambda f, size: _read_into(f, buffer.take(size)))
        return info, view.toreadonly()

    def _read(
        self, name: str, max_bytes: int | None, read: Callable[[BinaryIO, int], _Data]
    ) -> tuple[BlobInfo, _Data]:
        """The blob's info and its stored bytes as `read(file, size)` returns them."""
        check_max_bytes(max_bytes)
        # Files are only ever replaced, never modified, so one open fd is one consistent version.
        with self._open(name) as f:
            info, _ = self._read_header(f, name)
            if max_bytes is not None and info.size > max_bytes:
                raise BlobTooLarge(
                    f"blob {name!r} stores {info.size} bytes, more than max_bytes={max_bytes}"
                )
            data = read(f, info.size)
        if len(data) != info.size:
            raise BlobCorrupt(f"blob {name!r} is shorter than its file size says")
        return info, data

    def stat(self, name: str) -> BlobInfo:
        """See `BlobStore.stat`."""
        with self._open(name) as f:
            return self._read_header(f, name)[0]

    def exists(self, name: str) -> bool:
        """See `BlobStore.exists`."""
        return self._path(name).is_file()

    def delete(self, name: str) -> bool:
        """See `BlobStore.delete`."""
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise BlobBackendError(f"cannot delete blob {name!r}: {e}") from e
        _fsync_dir(path.parent)
        return True

    def list(self, prefix: str = "") -> builtins.list[str]:
        """See `BlobStore.list`."""
        *dirs, _ = validate_prefix(prefix).split("/")
        start = self._root.joinpath(*(d + _DIR_SUFFIX for d in dirs))
        base = "".join(d + "/" for d in dirs)
        return sorted(n for n in self._walk(start, base) if n.startswith(prefix))

    def _walk(self, directory: Path, base: str) -> Iterator[str]:
        try:
            entries = builtins.list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise BlobBackendError(f"cannot list {str(directory)!r}: {e}") from e
        for entry in entries:
            if entry.name.endswith(_DIR_SUFFIX) and entry.is_dir(follow_symlinks=False):
                yield from self._walk(
                    Path(entry.path), base + entry.name[: -len(_DIR_SUFFIX)] + "/"
                )
            elif entry.name.endswith(_FILE_SUFFIX) and entry.is_file(follow_symlinks=False):
                yield base + entry.name[: -len(_FILE_SUFFIX)]


def _read_into(f: BinaryIO, view: memoryview) -> memoryview:
    """Fills `view` from `f`; returns the part filled (shorter only at end of file)."""
    filled = 0
    while filled < len(view):
        got = f.readinto(view[filled:])  # type: ignore[attr-defined]
        if not got:
            break
        filled += got
    return view[:filled]
