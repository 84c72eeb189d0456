"""Container images as root file systems: unpacked safely, once, into a cache.

A container image is a tarball of a root file system, or (``docker save``, OCI
image layout) a tarball of layer tarballs applied in order, where whiteout
files delete what lower layers made. ``prepare_image`` turns one into a
directory the sandbox can pivot_root into:

1. the archive is hashed (the hash is remembered per (path, size, mtime,
   ctime, inode) so a big image is not rehashed every session);
2. ``CACHE/<sha256>/rootfs`` is returned at once if its marker file exists: the
   marker is written last, after an atomic rename, so it means "complete";
3. otherwise, under a per-image file lock (concurrent xdist workers wait, never
   unpack twice), the archive is unpacked into a temporary directory beside the
   final one, renamed into place, and the marker written.

Extraction is our own loop over ``tarfile`` members rather than
``TarFile.extractall``: Python 3.10 and early 3.11 have no extraction filters,
and the filters that exist do not fit images (``data_filter`` refuses the
absolute symlinks every image has, ``/bin/sh -> /bin/busybox``;
``tar_filter`` silently strips leading slashes and setuid bits instead of
refusing). Every write goes through directory file descriptors opened with
O_NOFOLLOW, so no member is ever written through a symlink, whatever earlier
members made. This module never imports pytest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import lzma
import os
import platform
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import filelock

__all__ = ["ImageError", "default_cache_dir", "prepare_image"]

log = logging.getLogger(__name__)

_LOCK_TIMEOUT = 1800.0  # seconds a worker waits for another one unpacking the same image
_INDEX_MAX = 256  # remembered archive hashes
_JSON_MAX = 16 << 20  # manifests and indexes larger than this are not image metadata
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_DEPTH = 256  # path components; real images stay far below, and it bounds recursion
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_FORMATS = ".tar, .tar.gz/.tgz, .tar.xz, .tar.bz2, a `docker save` tarball or an OCI image layout"
_OCI_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


class ImageError(Exception):
    """An image cannot be used as a root; the message names the archive, the member,
    the rule broken and the fix."""

    def __init__(self, message: str, *, archive: str | None = None, member: str | None = None):
        super().__init__(message)
        self.archive = archive
        self.member = member


class _Refused(Exception):
    """A member breaks a rule; turned into ImageError where the member is known."""

    def __init__(self, rule: str, fix: str):
        super().__init__(rule)
        self.rule = rule
        self.fix = fix


@dataclass(frozen=True)
class _Policy:
    allow_devices: bool
    allow_setuid: bool
    keep_owners: bool  # as root, keep the archive's numeric uid/gid


def default_cache_dir() -> str:
    """Where unpacked images live: ``$PYTEST_ISOLATE_CACHE/images`` if set, else
    ``$XDG_CACHE_HOME/pytest-isolate/images``, else ``~/.cache/pytest-isolate/images``."""
    base = os.environ.get("PYTEST_ISOLATE_CACHE", "")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        # The XDG spec says a relative value is invalid and must be ignored.
        cache = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(cache, "pytest-isolate")
    return os.path.join(os.path.abspath(base), "images")


def prepare_image(
    source: str, cache_dir: str, *, allow_devices: bool = False, allow_setuid: bool = False
) -> str:
    """Return the absolute path of a root file system made from ``source``.

    ``source`` is a directory (checked and returned as is, made absolute) or an
    image archive (.tar, .tar.gz/.tgz, .tar.xz, .tar.bz2, ``docker save``, OCI
    layout), unpacked once into ``cache_dir`` keyed by its content. Members that
    escape the root, write through symlinks, hard-link outside or forward, device
    nodes and fifos (unless ``allow_devices``) and setuid/setgid files (unless
    ``allow_setuid``) raise ImageError, and the partial unpack is removed.
    """
    if os.path.isdir(source):
        return os.path.abspath(source)
    if not os.path.lexists(source):
        raise ImageError(
            f"image {source!r} does not exist; fix: give an existing directory "
            f"or an image archive ({_FORMATS})",
            archive=source,
        )
    if not os.path.isfile(source):
        raise ImageError(
            f"image {source!r} is neither a directory nor a regular file; fix: "
            f"give a directory or an image archive ({_FORMATS})",
            archive=source,
        )
    cache_dir = os.path.abspath(cache_dir)
    _prepare_cache_dir(cache_dir)
    policy = _Policy(allow_devices, allow_setuid, keep_owners=os.geteuid() == 0)
    variant = "rootfs" + ("+devices" if allow_devices else "") + ("+setuid" if allow_setuid else "")
    try:
        archive = open(source, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise ImageError(
            f"image {source!r} cannot be read: {exc.strerror}; fix: make it "
            "readable by the user running pytest",
            archive=source,
        ) from exc
    with archive:
        identity = _identity(os.fstat(archive.fileno()))
        digest = _archive_digest(source, archive, identity, cache_dir)
        image_dir = os.path.join(cache_dir, digest)
        rootfs = os.path.join(image_dir, variant)
        marker = rootfs + ".done"
        if os.path.exists(marker) and os.path.isdir(rootfs):
            return rootfs
        with contextlib.suppress(FileExistsError):
            os.mkdir(image_dir, 0o700)
        with _locked(os.path.join(image_dir, variant + ".lock"), source):
            if os.path.exists(marker) and os.path.isdir(rootfs):  # done while we waited
                return rootfs
            _remove_stale(image_dir, variant)
            started = time.monotonic()
            log.info("unpacking image %s (sha256 %s) into %s", source, digest, rootfs)
            staging = tempfile.mkdtemp(prefix=variant + ".tmp-", dir=image_dir)
            try:
                os.chmod(staging, 0o755)
                summary = _unpack(archive, source, staging, policy)
                if _identity(os.fstat(archive.fileno())) != identity:
                    raise ImageError(
                        f"image {source!r} changed while it was being unpacked; "
                        "fix: do not rebuild an image while tests use it, then "
                        "rerun",
                        archive=source,
                    )
                os.rename(staging, rootfs)
            except BaseException:
                _remove_tree(staging)
                raise
            seconds = time.monotonic() - started
            summary.update(
                source=os.path.abspath(source),
                sha256=digest,
                variant=variant,
                uid=os.geteuid(),
                unpack_seconds=round(seconds, 4),
            )
            _write_json_atomic(marker, summary)  # last: its presence means "complete"
            log.info(
                "unpacked image %s: %s, %d layer(s), %d member(s) in %.3f s",
                source,
                summary["format"],
                summary["layers"],
                summary["members"],
                seconds,
            )
            return rootfs


# -- the cache -----------------------------------------------------------------------------


def _prepare_cache_dir(cache_dir: str) -> None:
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        st = os.stat(cache_dir)
    except OSError as exc:
        raise ImageError(
            f"image cache {cache_dir!r} cannot be created: {exc.strerror}; fix: "
            "set PYTEST_ISOLATE_CACHE to a writable directory"
        ) from exc
    # Whoever can write into the cache can plant a finished-looking image that tests
    # then run in: refuse a cache others control, as ssh refuses a shared ~/.ssh.
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ImageError(
            f"image cache {cache_dir!r} is owned by uid {st.st_uid} with mode "
            f"0o{stat.S_IMODE(st.st_mode):o}; it must belong to you (uid {os.geteuid()}) and "
            "not be writable by group or others, since whoever writes there chooses the root "
            f"your tests run in; fix: chmod go-w {cache_dir}, or set PYTEST_ISOLATE_CACHE to a "
            "private directory"
        )


def _identity(st: os.stat_result) -> list[int]:
    # ctime is in the key because mtime can be set back by anyone (touch -d); ctime cannot.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _archive_digest(source: str, archive: IO[bytes], identity: list[int], cache_dir: str) -> str:
    index_path = os.path.join(cache_dir, "digests.json")
    key = os.path.realpath(source)
    entry = _read_json_file(index_path).get(key)
    if isinstance(entry, dict) and entry.get("stat") == identity:
        digest = entry.get("sha256")
        if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    sha = hashlib.sha256()
    archive.seek(0)
    while chunk := archive.read(1 << 20):
        sha.update(chunk)
    digest = sha.hexdigest()
    with filelock.FileLock(index_path + ".lock", timeout=_LOCK_TIMEOUT):
        index = _read_json_file(index_path)
        index[key] = {"stat": identity, "sha256": digest, "used": time.time()}
        if len(index) > _INDEX_MAX:
            oldest = sorted(index, key=lambda k: _used(index[k]))
            for stale in oldest[: len(index) - _INDEX_MAX]:
                del index[stale]
        _write_json_atomic(index_path, index)
    return digest


def _used(entry: Any) -> float:
    used = entry.get("used") if isinstance(entry, dict) else None
    return float(used) if isinstance(used, (int, float)) else 0.0


def _read_json_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}  # missing or damaged: the index is only a shortcut, rebuilt on demand
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: str, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: str, source: str) -> Iterator[None]:
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("waiting for another process unpacking image %s (lock %s)", source, path)
        try:
            lock.acquire(timeout=_LOCK_TIMEOUT)
        except filelock.Timeout:
            raise ImageError(
                f"image {source!r}: another process has been unpacking it for "
                f"{_LOCK_TIMEOUT:.0f} s (lock {path}); fix: end that process, or "
                "remove the image's cache directory",
                archive=source,
            ) from None
    try:
        yield
    finally:
        lock.release()


def _remove_stale(image_dir: str, variant: str) -> None:
    # We hold the lock, so staging directories left here belong to a crashed unpack, and
    # a rootfs without its marker was renamed into place by one that died just before
    # writing the marker.
    for name in os.listdir(image_dir):
        if name.startswith(variant + ".tmp-") or name == variant:
            _remove_tree(os.path.join(image_dir, name))


def _remove_tree(path: str) -> None:
    parent = os.open(os.path.dirname(path), _DIR_FLAGS)
    try:
        _remove_entry(parent, os.path.basename(path))
    except FileNotFoundError:
        pass
    finally:
        os.close(parent)


def _remove_entry(parent_fd: int, name: str) -> None:
    """Remove ``name`` under ``parent_fd`` recursively, never following a symlink."""
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    if os.geteuid() != 0 and st.st_mode & 0o700 != 0o700:
        # Rootless, a 0555 directory cannot be emptied; it is ours, so open it up (it is a
        # real directory, lstat said so, and nobody else writes in the cache).
        os.chmod(name, 0o700, dir_fd=parent_fd)
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        for child in os.listdir(fd):
            _remove_entry(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


# -- archive formats -----------------------------------------------------------------------


def _unpack(archive: IO[bytes], label: str, root: str, policy: _Policy) -> dict[str, Any]:
    archive.seek(0)
    _check_compression(archive.read(4), label)
    archive.seek(0)
    try:
        outer = tarfile.open(fileobj=archive, mode="r:*")  # noqa: SIM115 (closed below)
    except (tarfile.TarError, EOFError, OSError) as exc:
        why = " ".join(str(exc).split())  # tarfile lists each method tried, one per line
        raise ImageError(
            f"image {label!r} is not a readable tar archive ({why}); fix: give a "
            f"directory or an image archive ({_FORMATS})",
            archive=label,
        ) from exc
    extractor = _Extractor(root, policy)
    try:
        with outer:
            kind, members = _detect_format(outer)
            if kind == "tar":
                extractor.apply_layer(outer, label, layered=False)
                layers = 1
            else:
                names = (_docker_layers if kind == "docker-save" else _oci_layers)(
                    outer, members, label
                )
                for name in names:
                    _apply_inner_layer(outer, members, name, label, extractor)
                layers = len(names)
            extractor.finalize(label)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        # Errors of members are ImageErrors already; what is left is a damaged stream.
        raise ImageError(
            f"image {label!r} is damaged: {exc}; fix: download or build it again", archive=label
        ) from exc
    finally:
        extractor.close()
    return {"format": kind, "layers": layers, "members": extractor.count}


def _check_compression(magic: bytes, label: str) -> None:
    if magic == _ZSTD_MAGIC:
        raise ImageError(
            f"image {label!r} is zstd-compressed, which Python's tarfile cannot "
            "read before 3.14; fix: decompress it (zstd -d) or recompress it with "
            "gzip or xz",
            archive=label,
        )


def _detect_format(outer: tarfile.TarFile) -> tuple[str, dict[str, tarfile.TarInfo]]:
    """Tell a plain rootfs tarball from a docker-save or OCI layout one.

    Headers are read only until a member that no image layout has (a layout holds
    top-level files, ``<id>/{layer.tar,json,VERSION}`` and ``blobs/<alg>/<hex>``),
    so a plain rootfs such as ``bin/sh`` is decided at once and not read twice.
    """
    members: dict[str, tarfile.TarInfo] = {}
    while (member := outer.next()) is not None:
        parts = [p for p in member.name.split("/") if p not in ("", ".")]
        if (
            len(parts) >= 2
            and parts[0] != "blobs"
            and (len(parts) > 2 or parts[1] not in ("layer.tar", "json", "VERSION"))
        ):
            return "tar", {}
        members["/".join(parts)] = member
    if "manifest.json" in members:
        return "docker-save", members
    if "index.json" in members and "oci-layout" in members:
        return "oci-layout", members
    return "tar", {}


def _read_json_member(
    outer: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, label: str
) -> Any:
    member = members.get(name)
    f = outer.extractfile(member) if member is not None else None
    if f is None:
        raise ImageError(
            f"image {label!r} has no file {name!r} although its layout needs one; "
            "fix: save the image again (docker save IMAGE -o FILE.tar)",
            archive=label,
        )
    try:
        return json.loads(f.read(_JSON_MAX + 1)[:_JSON_MAX])
    except ValueError as exc:
        raise ImageError(
            f"image {label!r}: {name!r} is not valid JSON ({exc}); fix: save the image again",
            archive=label,
            member=name,
        ) from exc


def _docker_layers(
    outer: tarfile.TarFile, members: dict[str, tarfile.TarInfo], label: str
) -> list[str]:
    manifest = _read_json_member(outer, members, "manifest.json", label)
    if not isinstance(manifest, list) or len(manifest) != 1 or not isinstance(manifest[0], dict):
        tags = (
            [m.get("RepoTags") for m in manifest if isinstance(m, dict)]
            if isinstance(manifest, list)
            else []
        )
        raise ImageError(
            f"image {label!r}: manifest.json must describe exactly one image, "
            f"found {len(tags)} (tags {tags}); fix: save one image per archive "
            "(docker save IMAGE:TAG -o FILE.tar)",
            archive=label,
        )
    layers = manifest[0].get("Layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ImageError(
            f"image {label!r}: manifest.json has no list of layer paths "
            "('Layers'); fix: save the image again",
            archive=label,
        )
    return [str(x) for x in layers]


def _oci_layers(
    outer: tarfile.TarFile, members: dict[str, tarfile.TarInfo], label: str
) -> list[str]:
    document = _read_json_member(outer, members, "index.json", label)
    for _ in range(4):  # an index may point to a per-platform index; bounded against loops
        descriptor = _select_manifest(document, label)
        document = _read_json_member(outer, members, _blob_path(descriptor, label), label)
        if descriptor.get("mediaType") not in _OCI_INDEX_TYPES:
            break
    layers = document.get("layers") if isinstance(document, dict) else None
    if not isinstance(layers, list):
        raise ImageError(
            f"image {label!r}: the OCI manifest has no 'layers' list; fix: save the image again",
            archive=label,
        )
    names = []
    for layer in layers:
        media = str(layer.get("mediaType", "")) if isinstance(layer, dict) else ""
        if "zstd" in media:
            raise ImageError(
                f"image {label!r}: layer {layer.get('digest')} is zstd-compressed "
                f"({media}), which Python's tarfile cannot read before 3.14; fix: "
                "export the image with gzip layers",
                archive=label,
            )
        names.append(_blob_path(layer, label))
    return names


def _select_manifest(index: Any, label: str) -> dict[str, Any]:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(
            f"image {label!r}: the OCI index lists no manifests; fix: save the image again",
            archive=label,
        )
    if len(manifests) == 1 and isinstance(manifests[0], dict):
        return manifests[0]
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        platform.machine(), platform.machine()
    )
    fitting = [
        m
        for m in manifests
        if isinstance(m, dict)
        and isinstance(m.get("platform"), dict)
        and m["platform"].get("os") == "linux"
        and m["platform"].get("architecture") == arch
    ]
    if len(fitting) != 1:
        raise ImageError(
            f"image {label!r}: the OCI index lists {len(manifests)} manifests and "
            f"{len(fitting)} of them are for linux/{arch}; fix: export the image "
            f"for one platform (e.g. --platform linux/{arch})",
            archive=label,
        )
    return fitting[0]


def _blob_path(descriptor: Any, label: str) -> str:
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    match = re.fullmatch(r"(sha256|sha512):([0-9a-f]{64,128})", str(digest))
    if match is None:
        raise ImageError(
            f"image {label!r}: descriptor digest {digest!r} is not "
            "'sha256:<hex>'; fix: save the image again",
            archive=label,
        )
    return f"blobs/{match.group(1)}/{match.group(2)}"


def _apply_inner_layer(
    outer: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    name: str,
    label: str,
    extractor: _Extractor,
) -> None:
    where = f"{label}:{name}"
    key = "/".join(p for p in name.split("/") if p not in ("", "."))
    member = members.get(key)
    try:
        # extractfile resolves symlink members by looking the target up among the
        # archive's members (never on disk): docker save links identical layers.
        f = outer.extractfile(member) if member is not None else None
    except KeyError:
        f = None
    if f is None:
        raise ImageError(
            f"image {label!r}: layer {name!r} named by its manifest is missing from "
            "the archive; fix: save the image again",
            archive=label,
            member=name,
        )
    _check_compression(f.read(4), where)
    f.seek(0)
    try:
        with tarfile.open(fileobj=f, mode="r|*") as layer:
            extractor.apply_layer(layer, where, layered=True)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        why = " ".join(str(exc).split())
        raise ImageError(
            f"image {label!r}: layer {name!r} is not a readable tar archive "
            f"({why}); fix: save the image again",
            archive=label,
            member=name,
        ) from exc


# -- extraction ----------------------------------------------------------------------------


def _relative_parts(path: str) -> tuple[str, ...]:
    if path.startswith("/"):
        raise _Refused(
            "has an absolute path; absolute names are refused, not silently made "
            "relative, because such an archive was not built as an image",
            "build the archive relative to the image root: tar -C ROOTDIR -cf IMAGE.tar .",
        )
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _Refused(
            "has a '..' component, which could escape the image root",
            "build the archive relative to the image root: tar -C ROOTDIR -cf IMAGE.tar .",
        )
    if len(parts) > _MAX_DEPTH:
        raise _Refused(
            f"has {len(parts)} path components, more than the {_MAX_DEPTH} an image root may have",
            "rebuild the archive without such deep paths",
        )
    return parts


class _Extractor:
    """Applies tar members under ``root`` through O_NOFOLLOW directory descriptors."""

    def __init__(self, root: str, policy: _Policy):
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.policy = policy
        self.count = 0
        # Directory metadata is applied last, deepest first: a 0555 directory must stay
        # writable while its children are made, and writing a child changes its mtime.
        self.dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}
        # Descriptors of directories by path, dropped whenever anything is removed, so a
        # cached descriptor always is the directory now at that path.
        self.fds: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        self._forget_fds()
        os.close(self.root_fd)

    def _forget_fds(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def apply_layer(self, tar: tarfile.TarFile, label: str, *, layered: bool) -> None:
        written: set[tuple[str, ...]] = set()  # this layer's paths and their parents
        for member in tar:
            if len(self.fds) > 256:  # between members, when no descriptor is in use
                self._forget_fds()
            try:
                parts = _relative_parts(member.name)
                if layered and parts and parts[-1].startswith(_WHITEOUT):
                    self._whiteout(parts, written)
                    continue
                self._extract(tar, member, parts)
            except _Refused as refused:
                raise ImageError(
                    f"image {label!r}: member {member.name!r} {refused.rule}; fix: {refused.fix}",
                    archive=label,
                    member=member.name,
                ) from None
            except (OverflowError, ValueError) as exc:  # a huge uid, mtime or device number
                raise ImageError(
                    f"image {label!r}: member {member.name!r} has a field out of "
                    f"range ({exc}); fix: rebuild the archive",
                    archive=label,
                    member=member.name,
                ) from exc
            except OSError as exc:
                code = errno.errorcode.get(exc.errno or 0, "?")
                raise ImageError(
                    f"image {label!r}: member {member.name!r} could not be "
                    f"unpacked: {exc.strerror} ({code}); fix: check the archive "
                    "with `tar -tvf` and the space left in the cache",
                    archive=label,
                    member=member.name,
                ) from exc
            self.count += 1
            written.update(parts[:i] for i in range(1, len(parts) + 1))

    def finalize(self, label: str) -> None:
        """Set directory owners, modes and times, deepest first."""
        self._forget_fds()
        for parts in sorted(self.dirs, key=len, reverse=True):
            if len(self.fds) > 256:
                self._forget_fds()
            try:
                fd = self._open_dir(parts, create=False)
                if fd is not None:
                    self._apply_metadata(self.dirs[parts], fd=fd)
            except _Refused:
                continue  # replaced by a symlink or file in a later layer
            except OSError as exc:
                raise ImageError(
                    f"image {label!r}: directory {'/'.join(parts)!r}: metadata "
                    f"could not be set: {exc.strerror}",
                    archive=label,
                ) from exc

    def _open_dir(self, parts: tuple[str, ...], *, create: bool) -> int | None:
        """Descriptor of directory ``parts``, each component opened with O_NOFOLLOW.

        Returns None if a component is missing and ``create`` is false. A component
        that is a symlink or not a directory is refused: writing through it could
        land outside the root (``link -> /etc`` then ``link/passwd``). The
        descriptor belongs to the cache: callers do not close it.
        """
        if not parts:
            return self.root_fd
        cached = self.fds.get(parts)
        if cached is not None:
            return cached
        fd = self._open_dir(parts[:-1], create=create)
        if fd is None:
            return None
        name = parts[-1]
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(name, 0o755, dir_fd=fd)  # parents an archive omits are made, as tar does
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            what = (
                f"a symlink (-> {os.readlink(name, dir_fd=fd)!r})"
                if stat.S_ISLNK(st.st_mode)
                else "not a directory"
            )
            raise _Refused(
                f"lies under {'/'.join(parts)!r}, which is {what}; extraction never "
                "writes through a symlink or a file, since that could reach outside "
                "the image root",
                "store the member at its real path inside the image",
            ) from None
        self.fds[parts] = child
        return child

    def _check_member(self, member: tarfile.TarInfo) -> None:
        if member.ischr() or member.isblk() or member.isfifo():
            if not self.policy.allow_devices:
                what = (
                    "a fifo"
                    if member.isfifo()
                    else f"a {'character' if member.ischr() else 'block'} device node "
                    f"({member.devmajor}, {member.devminor})"
                )
                raise _Refused(
                    f"is {what}; device nodes and fifos are refused, since a device "
                    "node in a test's root can reach host hardware",
                    "leave /dev out of the image (the container gets a minimal /dev "
                    "of its own), or pass allow_devices=True if the test needs them",
                )
        elif not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise _Refused(
                f"has tar type {member.type!r}, which an image root does not need",
                "rebuild the archive without it",
            )
        # A setgid directory only makes new files inherit its group (Debian's /var/mail):
        # harmless, kept. On a file, setuid/setgid grant privileges to whoever runs it.
        special = member.isdir() or member.issym() or member.islnk()
        if (
            member.mode & (stat.S_ISUID | stat.S_ISGID)
            and not special
            and not self.policy.allow_setuid
        ):
            bit = "setuid" if member.mode & stat.S_ISUID else "setgid"
            raise _Refused(
                f"has the {bit} bit (mode 0o{member.mode:o}); setuid and setgid "
                "files are refused, not silently stripped, because they raise "
                "privileges inside the test's container",
                "clear the bit when building the image (chmod ug-s), or pass "
                "allow_setuid=True if the test needs it",
            )

    def _extract(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...]
    ) -> None:
        if not parts:
            if not member.isdir():
                raise _Refused(
                    "would replace the image root itself",
                    "build the archive relative to the image root: tar -C ROOTDIR -cf IMAGE.tar .",
                )
            self.dirs[()] = member
            return
        self._check_member(member)
        if member.islnk():
            self._hardlink_source(member)  # refuse before anything is replaced
        parent = self._open_dir(parts[:-1], create=True)
        assert parent is not None
        name = parts[-1]
        try:
            existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if member.isdir() and stat.S_ISDIR(existing.st_mode):
                self.dirs[parts] = member
                return
            # A later member replaces an earlier one, as tar and Docker's layer
            # application do; removing drops cached descriptors, so reopen.
            self._remove(parts)
            parent = self._open_dir(parts[:-1], create=True)
            assert parent is not None
        if member.isdir():
            os.mkdir(name, 0o700, dir_fd=parent)
            self.dirs[parts] = member
        elif member.isreg():
            self._write_file(tar, member, parent, name)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)  # any target: resolved in the root
            self._apply_metadata(member, name=name, dir_fd=parent)
        elif member.islnk():
            source, source_dir = self._hardlink_source(member)
            os.link(source, name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)
        else:
            kind = (
                stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
            )
            os.mknod(
                name, 0o600 | kind, os.makedev(member.devmajor, member.devminor), dir_fd=parent
            )
            self._apply_metadata(member, name=name, dir_fd=parent)

    def _hardlink_source(self, member: tarfile.TarInfo) -> tuple[str, int]:
        """Name and directory descriptor of an earlier, non-directory member."""
        try:
            source = _relative_parts(member.linkname)
            source_dir = self._open_dir(source[:-1], create=False) if source else None
        except _Refused as refused:
            raise _Refused(
                f"is a hard link to {member.linkname!r}, whose name {refused.rule}",
                "hard links must name a file stored earlier in the same image",
            ) from None
        st = None
        if source_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(source[-1], dir_fd=source_dir, follow_symlinks=False)
        if source_dir is None or st is None or stat.S_ISDIR(st.st_mode):
            raise _Refused(
                f"is a hard link to {member.linkname!r}, which no earlier member of "
                "the image created",
                "hard links must name a file stored earlier in the same image",
            )
        return source[-1], source_dir

    def _write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent: int, name: str
    ) -> None:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        try:
            data = tar.extractfile(member)
            if data is not None:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    shutil.copyfileobj(data, out, 1 << 20)
            self._apply_metadata(member, fd=fd)
        finally:
            os.close(fd)

    def _apply_metadata(
        self,
        member: tarfile.TarInfo,
        *,
        fd: int | None = None,
        name: str = "",
        dir_fd: int | None = None,
    ) -> None:
        """Owner, then mode, then times: chown clears setuid bits, and writes move mtime.

        As root the archive's numeric ids are kept (names would be looked up in the
        host's passwd, which is not the image's); rootless, all is the caller's.
        """
        mtime_ns = int(member.mtime * 1_000_000_000)
        if fd is None:  # a symlink or a device node just made: act on the entry itself
            if self.policy.keep_owners:
                os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
            if not member.issym():
                os.chmod(name, stat.S_IMODE(member.mode), dir_fd=dir_fd)
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
            return
        if self.policy.keep_owners:
            os.fchown(fd, member.uid, member.gid)
        mode = stat.S_IMODE(member.mode)
        if member.isdir() and not self.policy.keep_owners:
            # Rootless, every file is the caller's anyway; a directory without owner
            # rwx would only make the cache impossible to remove with rm -rf.
            mode |= 0o700
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))

    def _remove(self, parts: tuple[str, ...]) -> None:
        """Remove ``parts`` (recursively, never following symlinks) if it exists."""
        parent = self._open_dir(parts[:-1], create=False)
        if parent is None:
            return
        try:
            _remove_entry(parent, parts[-1])
        except FileNotFoundError:
            return
        finally:
            self._forget_fds()  # descriptors of removed directories must not be reused
        # Metadata of removed directories must not land on whatever is made there later.
        for gone in [p for p in self.dirs if p[: len(parts)] == parts]:
            del self.dirs[gone]

    def _whiteout(self, parts: tuple[str, ...], written: set[tuple[str, ...]]) -> None:
        """Apply a whiteout; per the OCI spec it hides lower layers only, never its own."""
        directory, name = parts[:-1], parts[-1]
        if name == _OPAQUE:
            self._clear_lower(directory, written)
        elif name.startswith(_WHITEOUT + _WHITEOUT):
            return  # other AUFS metadata (.wh..wh.plnk): Docker ignores it too
        else:
            target = name[len(_WHITEOUT) :]
            if target in ("", ".", ".."):
                raise _Refused(
                    f"is a whiteout of {target!r}, which names no file", "rebuild the layer"
                )
            if (*directory, target) not in written:
                self._remove((*directory, target))

    def _clear_lower(self, directory: tuple[str, ...], written: set[tuple[str, ...]]) -> None:
        """Empty ``directory`` of what lower layers put there (an opaque whiteout)."""
        fd = self._open_dir(directory, create=False)
        if fd is None:
            return
        for child in sorted(os.listdir(fd)):
            path = (*directory, child)
            if path not in written:
                self._remove(path)
                continue
            fd = self._open_dir(directory, create=False)  # _remove dropped descriptors
            assert fd is not None
            if stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                self._clear_lower(path, written)  # kept by this layer, its lower content not
