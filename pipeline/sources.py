"""Where images come from: a folder (recursive), a glob or a text file of URIs, on any filesystem pyarrow knows."""
import fnmatch
import glob
import io
import os
import stat
import time

import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image

# Folders list only files with an extension some Pillow plugin claims; a glob or a URI list takes what it names.
Image.init()
IMAGE_EXTENSIONS = frozenset(Image.registered_extensions())
LIST_SUFFIXES = (".txt", ".lst", ".list")


def has_scheme(uri):
    """Whether uri names its filesystem (s3://, gs://, file://, ...) rather than being a local path."""
    return "://" in uri


def filesystem(uri, _cache={}):
    """(pyarrow filesystem, path in it) for a local path or a URI such as s3://bucket/key or file:///x; OSError
    naming the URI when pyarrow knows no such filesystem."""
    if not has_scheme(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    scheme = uri.split("://", 1)[0]
    if scheme == "file":
        return pafs.LocalFileSystem(), uri[len("file://"):]
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError) as e:  # ArrowInvalid: "Unrecognized filesystem type in URI"
        raise OSError(f"{uri}: cannot open: {str(e).splitlines()[0]}") from None
    return _cache.setdefault((scheme, uri.split("/")[2]), fs), path


def local_path(path):
    """A local path made absolute with its links resolved, so that one file has one name (workers may run
    elsewhere, and `./a.png` and `/data/a.png` must not be encoded twice)."""
    return os.path.realpath(path)


def _join(uri, path):
    """A listed path back in the form the user gave: pyarrow paths drop the scheme (s3://b/k -> b/k)."""
    return uri.split("://", 1)[0] + "://" + path if has_scheme(uri) else path


def _walk(uri):
    fs, root = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):  # os.walk streams; a recursive selector lists everything first
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    yield _join(uri, os.path.join(folder, name))
        return
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        base = info.base_name
        if info.type == pafs.FileType.File and not base.startswith(".") and \
                os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS:
            yield _join(uri, info.path)


def _glob(pattern):
    if not has_scheme(pattern):
        yield from sorted({local_path(p) for p in glob.iglob(os.path.abspath(pattern), recursive=True)
                           if os.path.isfile(p)})
        return
    # Remote: list everything under the part before the first wildcard, then match.
    fs, path = filesystem(pattern)
    base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.path, path):
            yield _join(pattern, info.path)


def _lines(uri):
    fs, path = filesystem(uri)
    seen = set()  # a URI listed twice is encoded once
    with fs.open_input_stream(path) as f:
        for line in io.TextIOWrapper(f, encoding="utf-8"):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line = line if has_scheme(line) else local_path(line)
            if line not in seen:
                seen.add(line)
                yield line


def read_object(fs, path, attempts=4, wait=0.25):
    """The whole file at path on fs. An object store's read that breaks off (a reset connection, a truncated
    response) is tried again, up to `attempts` times with doubling waits: a scheduled job should not fail on one
    dropped connection. Missing files and refusals are not retried; nor is anything on a local disk."""
    for attempt in range(attempts):
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError:
            if isinstance(fs, pafs.LocalFileSystem) or attempt == attempts - 1:
                raise
        time.sleep(wait * 2 ** attempt)


def list_images(source):
    """Every image URI the source names, as a stream: a text file of URIs (.txt/.lst), a glob, a folder or a file."""
    if any(c in source for c in "*?["):
        return _glob(source)
    if not has_scheme(source):
        source = local_path(source)
    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return _walk(source)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{source}: no such file or folder")
    if info.type != pafs.FileType.File:
        raise OSError(f"{source}: not a regular file or folder")
    if os.path.splitext(path)[1].lower() in LIST_SUFFIXES:
        return _lines(source)
    return iter([source])


FILE_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def read_bytes(uri):
    """The file's bytes. Raises OSError naming the file when it cannot be read: no such file, an unknown scheme,
    no permission, a link loop, or not a regular file (a FIFO would block the reader forever, a device never end)."""
    if not has_scheme(uri) or uri.startswith("file://"):
        return _read_local(uri, filesystem(uri)[1])
    fs, path = filesystem(uri)
    try:
        return read_object(fs, path)
    except (OSError, pa.ArrowException) as e:
        raise OSError(f"{uri}: cannot read: {str(e).splitlines()[0]}") from None


def _read_local(uri, path):
    try:
        mode = os.stat(path).st_mode  # the type before opening: opening a FIFO for reading blocks
        if stat.S_ISREG(mode):
            # O_NONBLOCK: should it have become a FIFO since, open returns at once and fstat refuses it.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                mode = os.fstat(fd).st_mode
                if stat.S_ISREG(mode):
                    return f.read()
    except OSError as e:
        raise OSError(f"{uri}: cannot read: {e.strerror or e}") from None
    raise OSError(f"{uri}: not a regular file: {FILE_KINDS.get(stat.S_IFMT(mode), 'a special file')}")
