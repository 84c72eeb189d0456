#!/usr/bin/env python3
"""Build layered test images: `docker save` tarballs and OCI image layouts, no Docker needed.

    python3 rootfs/layered_image.py --format oci BASE.tar.gz OUTPUT.tar
    python3 rootfs/layered_image.py --format docker-save BASE.tar.gz OUTPUT.tar

The base rootfs tarball (from build-busybox-image.sh) becomes layer 1; layer 2 is
``demo_layer()``: it adds /etc/layer2, deletes /bin/vi with a whiteout
(``bin/.wh.vi``) and empties /home with an opaque whiteout (``home/.wh..wh..opq``)
before adding /home/layer2. Unpacked correctly, the result has /etc/layer2, no
/bin/vi, and /home holds only layer2.

The functions are what the tests import: ``layer()`` makes a layer tarball from
a list of entries, ``write_docker_save()`` and ``write_oci_layout()`` wrap layers
the way ``docker save`` (manifest.json + <id>/layer.tar) and an OCI layout
(oci-layout, index.json, blobs/sha256/...) do. Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

__all__ = ["Entry", "demo_layer", "layer", "write_docker_save", "write_oci_layout"]

_MTIME = 1_700_000_000  # fixed, so the same layers give the same bytes


@dataclass(frozen=True)
class Entry:
    """One member of a layer: ``kind`` is "file", "dir", "symlink" or "hardlink"."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""  # symlink or hard link target
    mode: int = 0o644


def layer(entries: list[Entry]) -> bytes:
    """An uncompressed layer tarball holding ``entries`` in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = _MTIME
            info.mode = entry.mode
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = entry.mode if entry.mode != 0o644 else 0o755
            elif entry.kind == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
            info.size = len(entry.data) if entry.kind == "file" else 0
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
    return buffer.getvalue()


def demo_layer() -> bytes:
    """Layer 2 of the CLI's image: an added file, a whiteout and an opaque whiteout."""
    return layer([
        Entry("etc/layer2", data=b"added by layer 2\n"),
        Entry("bin/.wh.vi"),
        Entry("home", kind="dir"),
        Entry("home/.wh..wh..opq"),
        Entry("home/layer2", kind="dir"),
    ])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _config(layers: list[bytes]) -> bytes:
    # diff_ids are digests of the uncompressed layers, as the image spec requires.
    return json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{_sha256(x)}" for x in layers]},
    }, sort_keys=True).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_docker_save(output: str, layers: list[bytes], *, tag: str = "isolate/test:latest",
                      duplicate_as_symlink: bool = True) -> None:
    """Write ``layers`` (uncompressed tarballs, lowest first) as `docker save` does.

    A layer identical to an earlier one is stored as a symlink to it, as Docker does.
    """
    config = _config(layers)
    config_name = f"{_sha256(config)}.json"
    with tarfile.open(output, mode="w", format=tarfile.GNU_FORMAT) as tar:
        paths: list[str] = []
        first_with: dict[str, str] = {}
        for data in layers:
            digest = _sha256(data)
            path = f"{digest}/layer.tar" if digest not in first_with else f"{digest}x/layer.tar"
            if digest in first_with and duplicate_as_symlink:
                info = tarfile.TarInfo(path)
                info.type, info.linkname = tarfile.SYMTYPE, f"../{first_with[digest]}"
                info.mtime = _MTIME
                tar.addfile(info)
            else:
                _add(tar, path, data)
                first_with.setdefault(digest, path)
            paths.append(path)
        _add(tar, config_name, config)
        manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": paths}]
        _add(tar, "manifest.json", json.dumps(manifest).encode())


def write_oci_layout(output: str, layers: list[bytes], *, compress: bool = True,
                     other_platform: bool = False) -> None:
    """Write ``layers`` (uncompressed tarballs, lowest first) as an OCI image layout.

    ``compress`` stores gzip layers (as registries do); ``other_platform`` puts the
    manifest behind a multi-platform index beside an arm64 one, so the reader must pick.
    """
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str, **extra: object) -> dict[str, object]:
        blobs[_sha256(data)] = data
        return {"mediaType": media_type, "digest": f"sha256:{_sha256(data)}",
                "size": len(data), **extra}

    stored = [gzip.compress(x, mtime=0) if compress else x for x in layers]
    layer_type = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(_config(layers), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(x, layer_type) for x in stored],
    }
    manifest_type = "application/vnd.oci.image.manifest.v1+json"
    chosen = blob(json.dumps(manifest).encode(), manifest_type,
                  platform={"os": "linux", "architecture": "amd64"})
    if other_platform:
        arm = dict(manifest, layers=[])
        nested = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                blob(json.dumps(arm).encode(), manifest_type,
                     platform={"os": "linux", "architecture": "arm64"}),
                chosen,
            ],
        }
        chosen = blob(json.dumps(nested).encode(), "application/vnd.oci.image.index.v1+json")
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [chosen]}
    with tarfile.open(output, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", json.dumps(index).encode())
        for digest, data in sorted(blobs.items()):
            _add(tar, f"blobs/sha256/{digest}", data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=("oci", "docker-save"), default="oci")
    parser.add_argument("base", help="rootfs tarball for layer 1 (.tar, .tar.gz, .tar.xz)")
    parser.add_argument("output", help="the image tarball to write")
    args = parser.parse_args()
    with tarfile.open(args.base, mode="r:*") as base_tar:
        buffer = io.BytesIO()
        # Re-pack into an uncompressed layer; members are copied, never extracted.
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as out:
            for member in base_tar:
                out.addfile(member, base_tar.extractfile(member) if member.isreg() else None)
    layers = [buffer.getvalue(), demo_layer()]
    if args.format == "oci":
        write_oci_layout(args.output, layers)
    else:
        write_docker_save(args.output, layers)
    print(args.output)


if __name__ == "__main__":
    main()
