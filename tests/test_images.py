"""Image tarballs as roots: safe unpacking, layered formats, and the content-keyed cache.

The busybox image is built once per session by rootfs/build-busybox-image.sh;
hostile archives are built here with tarfile, each refused with a message that
names the archive, the member, the rule and the fix, and nothing written
outside the cache.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import filelock
import pytest
from conftest import requires

from pytest_isolate.images import ImageError, default_cache_dir, prepare_image

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "rootfs" / "build-busybox-image.sh"
BUSYBOX = os.environ.get("BUSYBOX", "/bin/busybox")
UNPACKED = "unpacked image"  # the log line written once per real unpack


def _load_layered_image() -> ModuleType:
    path = ROOT / "rootfs" / "layered_image.py"
    spec = importlib.util.spec_from_file_location("layered_image", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


layered = _load_layered_image()


# -- helpers -------------------------------------------------------------------------------


def member(
    name: str,
    kind: str = "file",
    *,
    data: bytes = b"data\n",
    target: str = "",
    mode: int | None = None,
    uid: int = 0,
    gid: int = 0,
    dev: tuple[int, int] = (0, 0),
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.uid, info.gid, info.mtime = uid, gid, 1_600_000_000
    types = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "blk": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    info.type = types[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    info.linkname = target
    info.devmajor, info.devminor = dev
    if kind == "file":
        info.size = len(data)
        return info, data
    return info, None


def write_tar(
    path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w"
) -> str:
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return str(path)


def layer_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def unpack_count(caplog: pytest.LogCaptureFixture) -> int:
    return sum(UNPACKED in r.getMessage() for r in caplog.records)


def cache_leftovers(cache: Path) -> list[str]:
    """Everything in the cache but the hash index and lock files."""
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if p.is_file() or p.is_symlink() or p.is_dir()
        if not p.name.endswith(".lock") and p.name != "digests.json"
        if not (p.is_dir() and len(p.name) == 64)
    )


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test image, built once per session by the recipe in rootfs/."""
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} missing: apt-get install busybox-static (or set BUSYBOX)")
    output = tmp_path_factory.mktemp("image") / "busybox.tar.gz"
    result = subprocess.run([str(RECIPE), str(output)], capture_output=True, text=True, check=False)
    if result.returncode != 0 and "busybox-static" in result.stderr:
        pytest.skip(f"cannot build the busybox image: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return str(output)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def unpack_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="pytest_isolate.images")
    return caplog


# -- the busybox image ---------------------------------------------------------------------


def test_busybox_tarball_unpacks_with_its_os_release_and_shell(
    busybox_image: str, cache: Path
) -> None:
    root = Path(prepare_image(busybox_image, str(cache)))
    assert root.is_absolute() and root.parent.parent == cache and root.name == "rootfs"
    assert "ID=isolate-busybox" in (root / "etc/os-release").read_text()
    assert os.readlink(root / "bin/sh") == "busybox"
    assert os.readlink(root / "usr/bin/env") == "/bin/busybox"  # absolute links stay as they are
    busybox = (root / "bin/busybox").lstat()
    assert stat.S_ISREG(busybox.st_mode) and busybox.st_mode & 0o111
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "proc").stat().st_mode) in (0o555, 0o755)
    assert (root / "proc").is_dir() and (root / "sys").is_dir() and (root / "dev").is_dir()
    assert "root:x:0:0" in (root / "etc/passwd").read_text()


@requires("root")
def test_busybox_image_runs_its_own_shell_under_chroot(busybox_image: str, cache: Path) -> None:
    root = prepare_image(busybox_image, str(cache))
    result = subprocess.run(
        ["chroot", root, "/bin/sh", "-c", "cat /etc/os-release; echo $0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "ID=isolate-busybox" in result.stdout


def test_second_prepare_of_same_image_is_a_cache_hit(
    busybox_image: str,
    cache: Path,
    unpack_log: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    started = time.perf_counter()
    first = prepare_image(busybox_image, str(cache))
    unpack = time.perf_counter() - started
    started = time.perf_counter()
    second = prepare_image(busybox_image, str(cache))
    hit = time.perf_counter() - started
    assert first == second
    assert unpack_count(unpack_log) == 1
    # Figures for reports (junit xml, -rA); the speed claims live in docs/images.md.
    request.node.user_properties += [
        ("unpack_seconds", round(unpack, 4)),
        ("cache_hit_seconds", round(hit, 6)),
    ]
    marker = json.loads(Path(first + ".done").read_text())
    assert marker["format"] == "tar" and marker["layers"] == 1 and marker["members"] > 200


def test_same_content_under_another_name_shares_the_cache_entry(
    busybox_image: str, cache: Path, tmp_path: Path, unpack_log: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "copy.tar.gz"
    shutil.copyfile(busybox_image, copy)
    assert prepare_image(busybox_image, str(cache)) == prepare_image(str(copy), str(cache))
    assert unpack_count(unpack_log) == 1


def test_rewritten_archive_gets_a_new_cache_entry(tmp_path: Path, cache: Path) -> None:
    image = tmp_path / "image.tar"
    write_tar(image, [member("etc/version", data=b"1\n")])
    first = prepare_image(str(image), str(cache))
    write_tar(image, [member("etc/version", data=b"2\n")])
    second = prepare_image(str(image), str(cache))
    assert first != second
    assert Path(second, "etc/version").read_text() == "2\n"


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2"])
def test_compressed_rootfs_tarballs_unpack(tmp_path: Path, cache: Path, mode: str) -> None:
    image = write_tar(
        tmp_path / f"image.{mode[2:]}",
        [member("./", "dir"), member("./etc", "dir"), member("./etc/os-release", data=b"ID=x\n")],
        mode,
    )
    assert Path(prepare_image(image, str(cache)), "etc/os-release").read_text() == "ID=x\n"


def test_directory_source_is_returned_as_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    (tmp_path / "myroot").mkdir()
    monkeypatch.chdir(tmp_path)
    assert prepare_image("myroot", str(cache)) == str(tmp_path / "myroot")


def test_missing_source_is_refused_naming_it(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"image '.*/nope.tar' does not exist; fix: "):
        prepare_image(str(tmp_path / "nope.tar"), str(cache))


def test_file_that_is_not_a_tarball_is_refused(cache: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(ImageError, match=r"is not a readable tar archive .*fix: "):
        prepare_image(str(junk), str(cache))


def test_zstd_archive_is_refused_with_a_fix(cache: Path, tmp_path: Path) -> None:
    image = tmp_path / "image.tar.zst"
    image.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 64)
    with pytest.raises(ImageError, match=r"zstd-compressed.*fix: decompress it"):
        prepare_image(str(image), str(cache))


# -- hostile archives ----------------------------------------------------------------------

HOSTILE = {
    # name: (members, sentinel relative to tmp_path, words the message must hold)
    "dotdot": ([member("../../../escaped")], "escaped", "'..' component"),
    "dotdot-inside": ([member("etc/../../../../escaped")], "escaped", "'..' component"),
    "absolute": ([member("{tmp}/abs-escaped")], "abs-escaped", "absolute path"),
    "symlink-parent-absolute": (
        [member("link", "symlink", target="{tmp}/outside"), member("link/pwned")],
        "outside/pwned",
        "which is a symlink",
    ),
    "symlink-parent-relative": (
        [member("link", "symlink", target="../../../outside"), member("link/pwned")],
        "outside/pwned",
        "which is a symlink",
    ),
    "symlink-grandparent": (
        [
            member("a", "dir"),
            member("a/link", "symlink", target="{tmp}/outside"),
            member("a/link/deeper/pwned"),
        ],
        "outside/deeper",
        "which is a symlink",
    ),
    "file-as-parent": ([member("f"), member("f/x")], "f", "not a directory"),
    "hardlink-absolute": (
        [member("passwd", "hardlink", target="/etc/passwd")],
        "passwd",
        "hard link to '/etc/passwd'",
    ),
    "hardlink-dotdot": (
        [member("passwd", "hardlink", target="../../../../../../etc/passwd")],
        "passwd",
        "'..' component",
    ),
    "hardlink-forward": (
        [member("early", "hardlink", target="late"), member("late")],
        "late",
        "which no earlier member",
    ),
    "hardlink-through-symlink": (
        [member("etc", "symlink", target="/etc"), member("pw", "hardlink", target="etc/passwd")],
        "pw",
        "which is a symlink",
    ),
    "block-device": (
        [member("dev/sda", "blk", dev=(8, 0), mode=0o660)],
        "sda",
        "block device node (8, 0)",
    ),
    "char-device": (
        [member("dev/mem", "chr", dev=(1, 1), mode=0o640)],
        "mem",
        "character device node (1, 1)",
    ),
    "fifo": ([member("run/pipe", "fifo")], "pipe", "is a fifo"),
    "setuid": ([member("bin/su", mode=0o4755)], "su", "setuid bit (mode 0o4755)"),
    "setgid": ([member("bin/wall", mode=0o2755)], "wall", "setgid bit (mode 0o2755)"),
    "root-replaced": ([member(".", "symlink", target="/")], "x", "replace the image root"),
    "whiteout-dotdot-free": ([member("etc/../../x")], "x", "'..' component"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_writes_nothing_outside_the_cache(
    case: str, tmp_path: Path, cache: Path
) -> None:
    specs, sentinel, words = HOSTILE[case]
    (tmp_path / "outside").mkdir()
    members = []
    for info, data in specs:
        info.name = info.name.replace("{tmp}", str(tmp_path))
        info.linkname = info.linkname.replace("{tmp}", str(tmp_path))
        members.append((info, data))
    image = write_tar(tmp_path / f"{case}.tar", [member("etc", "dir"), member("etc/ok"), *members])
    passwd = os.stat("/etc/passwd")

    with pytest.raises(ImageError) as refused:
        prepare_image(image, str(cache))

    message = str(refused.value)
    assert message.startswith(f"image {image!r}: member ")
    assert words in message and "; fix: " in message
    assert refused.value.archive == image and refused.value.member
    assert not (tmp_path / sentinel).exists()
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "abs-escaped").exists()
    assert os.listdir(tmp_path / "outside") == []
    assert cache_leftovers(cache) == []  # the partial unpack was removed
    for path in cache.rglob("*"):
        st = path.lstat()
        assert (st.st_ino, st.st_dev) != (passwd.st_ino, passwd.st_dev)
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink


def test_symlinks_pointing_anywhere_are_kept_as_symlinks(tmp_path: Path, cache: Path) -> None:
    image = write_tar(
        tmp_path / "links.tar",
        [
            member("usr/bin/python3.11", mode=0o755),
            member("usr/bin/python", "symlink", target="/usr/bin/python3.11"),
            member("up", "symlink", target="../../../../.."),
            member("etc-host", "symlink", target="/etc"),
        ],
    )
    root = Path(prepare_image(image, str(cache)))
    assert os.readlink(root / "usr/bin/python") == "/usr/bin/python3.11"
    assert os.readlink(root / "up") == "../../../../.."
    assert os.readlink(root / "etc-host") == "/etc"


def test_hard_links_within_the_image_share_an_inode(tmp_path: Path, cache: Path) -> None:
    image = write_tar(
        tmp_path / "links.tar",
        [
            member("bin/busybox", data=b"#!/bin/true\n", mode=0o755),
            member("bin/sh", "hardlink", target="bin/busybox"),
            member("./bin/ls", "hardlink", target="./bin/busybox"),
        ],
    )
    root = Path(prepare_image(image, str(cache)))
    assert (root / "bin/sh").stat().st_ino == (root / "bin/busybox").stat().st_ino
    assert (root / "bin/busybox").stat().st_nlink == 3


def test_setgid_directory_is_kept(tmp_path: Path, cache: Path) -> None:
    image = write_tar(tmp_path / "mail.tar", [member("var/mail", "dir", mode=0o2775)])
    root = Path(prepare_image(image, str(cache)))
    assert stat.S_IMODE((root / "var/mail").stat().st_mode) == 0o2775


def test_setuid_file_is_unpacked_when_allowed(tmp_path: Path, cache: Path) -> None:
    image = write_tar(tmp_path / "su.tar", [member("bin/su", mode=0o4755)])
    root = Path(prepare_image(image, str(cache), allow_setuid=True))
    assert root.name == "rootfs+setuid"
    assert stat.S_IMODE((root / "bin/su").stat().st_mode) == 0o4755
    with pytest.raises(ImageError, match="setuid bit"):  # the default variant still refuses
        prepare_image(image, str(cache))


@requires("root")
def test_device_nodes_are_made_when_allowed(tmp_path: Path, cache: Path) -> None:
    image = write_tar(
        tmp_path / "dev.tar",
        [member("dev/null", "chr", dev=(1, 3), mode=0o666), member("run/pipe", "fifo")],
    )
    root = Path(prepare_image(image, str(cache), allow_devices=True))
    assert stat.S_ISCHR((root / "dev/null").lstat().st_mode)
    assert os.major((root / "dev/null").lstat().st_rdev) == 1
    assert stat.S_ISFIFO((root / "run/pipe").lstat().st_mode)


@requires("root")
def test_owners_from_the_archive_are_kept_as_root(tmp_path: Path, cache: Path) -> None:
    image = write_tar(
        tmp_path / "own.tar",
        [
            member("home/user", "dir", uid=1234, gid=2345, mode=0o750),
            member("home/user/notes", uid=1234, gid=2345, mode=0o600),
            member("home/user/link", "symlink", target="notes", uid=1234, gid=2345),
        ],
    )
    root = Path(prepare_image(image, str(cache)))
    for name in ("home/user", "home/user/notes", "home/user/link"):
        st = (root / name).lstat()
        assert (st.st_uid, st.st_gid) == (1234, 2345), name
    assert stat.S_IMODE((root / "home/user").stat().st_mode) == 0o750
    assert (root / "home/user/notes").stat().st_mtime == 1_600_000_000


def test_later_member_replaces_an_earlier_one(tmp_path: Path, cache: Path) -> None:
    image = write_tar(
        tmp_path / "dup.tar",
        [
            member("etc/motd", data=b"first\n"),
            member("etc/motd", data=b"second\n"),
            member("opt/tool", "dir"),
            member("opt/tool/x"),
            member("opt/tool", data=b"a file now\n"),
            member("bin/sh", data=b"old"),
            member("bin/sh", "symlink", target="busybox"),
        ],
    )
    root = Path(prepare_image(image, str(cache)))
    assert (root / "etc/motd").read_text() == "second\n"
    assert (root / "opt/tool").read_text() == "a file now\n"
    assert os.readlink(root / "bin/sh") == "busybox"


# -- layered images ------------------------------------------------------------------------


def _base_and_top() -> list[bytes]:
    base = layer_bytes(
        [
            member("bin", "dir"),
            member("bin/sh", data=b"shell"),
            member("bin/vi", data=b"editor"),
            member("etc", "dir"),
            member("etc/os-release", data=b"ID=base\n"),
            member("home", "dir", mode=0o755),
            member("home/old", "dir"),
            member("home/old/f"),
            member("home/keep", "dir"),
            member("home/keep/lower"),
            member("var", "dir", mode=0o700),
        ]
    )
    top = layer_bytes(
        [
            member("bin/.wh.vi"),  # deletes the lower /bin/vi
            member("home/keep", "dir"),
            member("home/keep/upper"),  # written before the opaque
            member("home/.wh..wh..opq"),  # hides everything lower in /home
            member("home/new", "dir"),
            member("etc/os-release", data=b"ID=top\n"),
            member("etc/added"),
            member("etc/.wh.added"),  # a whiteout never hides its own layer
            member("var", "dir", mode=0o755),
        ]
    )
    return [base, top]


def _check_layers_applied(root: Path) -> None:
    assert (root / "bin/sh").read_bytes() == b"shell"
    assert not (root / "bin/vi").exists()
    assert not list(root.rglob(".wh.*"))
    assert (root / "etc/os-release").read_text() == "ID=top\n"
    assert (root / "etc/added").exists()
    assert sorted(os.listdir(root / "home")) == ["keep", "new"]
    assert os.listdir(root / "home/keep") == ["upper"]
    assert stat.S_IMODE((root / "var").stat().st_mode) == 0o755


def test_docker_save_layers_apply_in_order_with_whiteouts(tmp_path: Path, cache: Path) -> None:
    image = str(tmp_path / "saved.tar")
    layered.write_docker_save(image, _base_and_top())
    root = Path(prepare_image(image, str(cache)))
    _check_layers_applied(root)
    assert json.loads(Path(f"{root}.done").read_text())["format"] == "docker-save"


def test_gzipped_docker_save_applies_its_layers(tmp_path: Path, cache: Path) -> None:
    saved = tmp_path / "saved.tar"
    layered.write_docker_save(str(saved), _base_and_top())
    image = tmp_path / "saved.tar.gz"  # docker save IMAGE | gzip > saved.tar.gz
    image.write_bytes(gzip.compress(saved.read_bytes()))
    _check_layers_applied(Path(prepare_image(str(image), str(cache))))


def test_docker_save_with_a_layer_stored_as_symlink_applies_it_twice(
    tmp_path: Path, cache: Path
) -> None:
    first = layer_bytes([member("etc/a", data=b"a")])
    second = layer_bytes([member("etc/.wh.a")])
    image = str(tmp_path / "saved.tar")
    layered.write_docker_save(image, [first, second, first])
    with tarfile.open(image) as tar:
        assert any(m.issym() for m in tar.getmembers())
    assert Path(prepare_image(image, str(cache)), "etc/a").read_text() == "a"


@pytest.mark.parametrize(("compress", "other_platform"), [(True, False), (False, True)])
def test_oci_layout_layers_apply_in_order_with_whiteouts(
    tmp_path: Path, cache: Path, compress: bool, other_platform: bool
) -> None:
    if other_platform and os.uname().machine != "x86_64":
        pytest.skip("the multi-platform layout holds amd64 and arm64 manifests only")
    image = str(tmp_path / "oci.tar")
    layered.write_oci_layout(
        image, _base_and_top(), compress=compress, other_platform=other_platform
    )
    root = Path(prepare_image(image, str(cache)))
    _check_layers_applied(root)
    marker = json.loads(Path(f"{root}.done").read_text())
    assert (marker["format"], marker["layers"]) == ("oci-layout", 2)


def test_layer_writing_through_a_lower_layers_symlink_is_refused(
    tmp_path: Path, cache: Path
) -> None:
    (tmp_path / "outside").mkdir()
    base = layer_bytes([member("link", "symlink", target=str(tmp_path / "outside"))])
    top = layer_bytes([member("link/pwned")])
    image = str(tmp_path / "oci.tar")
    layered.write_oci_layout(image, [base, top])
    with pytest.raises(
        ImageError,
        match=r"oci.tar:blobs/sha256/[0-9a-f]+': member 'link/pwned'"
        r" lies under 'link', which is a symlink",
    ):
        prepare_image(image, str(cache))
    assert os.listdir(tmp_path / "outside") == []
    assert cache_leftovers(cache) == []


def test_whiteout_through_a_symlink_removes_nothing_outside(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious").write_text("keep me")
    base = layer_bytes([member("link", "symlink", target=str(tmp_path / "outside"))])
    top = layer_bytes([member("link/.wh.precious")])
    image = str(tmp_path / "saved.tar")
    layered.write_docker_save(image, [base, top])
    with pytest.raises(ImageError, match="which is a symlink"):
        prepare_image(image, str(cache))
    assert (tmp_path / "outside" / "precious").read_text() == "keep me"


def test_docker_save_with_two_images_is_refused(tmp_path: Path, cache: Path) -> None:
    manifest = json.dumps(
        [{"RepoTags": ["a:1"], "Layers": []}, {"RepoTags": ["b:1"], "Layers": []}]
    ).encode()
    image = write_tar(tmp_path / "two.tar", [member("manifest.json", data=manifest)])
    with pytest.raises(ImageError, match=r"exactly one image, found 2 .*fix: save one image"):
        prepare_image(image, str(cache))


def test_demo_layered_image_from_the_recipe_applies_whiteouts(
    busybox_image: str, tmp_path: Path, cache: Path
) -> None:
    image = tmp_path / "demo.tar"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "rootfs" / "layered_image.py"),
            "--format",
            "oci",
            busybox_image,
            str(image),
        ],
        check=True,
        capture_output=True,
    )
    root = Path(prepare_image(str(image), str(cache)))
    assert (root / "etc/layer2").exists() and not (root / "bin/vi").exists()
    assert os.listdir(root / "home") == ["layer2"]
    assert os.readlink(root / "bin/sh") == "busybox"


# -- the cache -----------------------------------------------------------------------------

_WORKER = """
import logging, os, sys, time
from pytest_isolate import images
from pytest_isolate.images import prepare_image
image, cache, go, log = sys.argv[1:5]
logging.basicConfig(filename=log, level=logging.INFO, format="%(process)d %(message)s")
# Hold the lock a while, so the others always find it taken, however fast
# this machine unpacks (0.03 s) and however late the scheduler starts them.
_remove_stale = images._remove_stale
def slow_remove_stale(*args):
    time.sleep(0.5)
    return _remove_stale(*args)
images._remove_stale = slow_remove_stale
open(f"{go}.ready.{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
print(prepare_image(image, cache))
"""


def test_concurrent_processes_unpack_an_image_exactly_once(
    busybox_image: str, cache: Path, tmp_path: Path
) -> None:
    go, log = tmp_path / "go", tmp_path / "unpack.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, busybox_image, str(cache), str(go), str(log)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("go.ready.*"))) < len(workers) and time.monotonic() < deadline:
        time.sleep(0.005)  # start them together, so they race for the lock
    go.touch()
    paths = {w.communicate(timeout=60)[0].strip() for w in workers}
    assert [w.returncode for w in workers] == [0] * 4
    assert len(paths) == 1 and Path(paths.pop(), "etc/os-release").exists()
    assert log.read_text().count(UNPACKED) == 1
    assert "waiting for another process" in log.read_text()  # they did race for it


def test_leftovers_of_an_interrupted_unpack_are_replaced(
    tmp_path: Path, cache: Path, unpack_log: pytest.LogCaptureFixture
) -> None:
    image = write_tar(tmp_path / "image.tar", [member("etc/os-release", data=b"ID=x\n")])
    root = Path(prepare_image(image, str(cache)))
    # Simulate a crash after the rename (no marker) and one mid-unpack (a staging dir).
    Path(f"{root}.done").unlink()
    (root / "etc/os-release").write_text("half\n")
    (root.parent / "rootfs.tmp-crashed").mkdir()
    assert prepare_image(image, str(cache)) == str(root)
    assert (root / "etc/os-release").read_text() == "ID=x\n"
    assert not (root.parent / "rootfs.tmp-crashed").exists()
    assert unpack_count(unpack_log) == 2


def test_cache_writable_by_others_is_refused(tmp_path: Path, cache: Path) -> None:
    image = write_tar(tmp_path / "image.tar", [member("etc/os-release")])
    cache.chmod(0o777)
    with pytest.raises(ImageError, match=r"not be writable by group or others.*fix: chmod go-w"):
        prepare_image(image, str(cache))


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE", "/srv/ci-cache")
    assert default_cache_dir() == "/srv/ci-cache/images"
    monkeypatch.delenv("PYTEST_ISOLATE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/me")
    assert default_cache_dir() == "/var/cache/me/pytest-isolate/images"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", "/home/me")
    assert default_cache_dir() == "/home/me/.cache/pytest-isolate/images"


# -- rootless ------------------------------------------------------------------------------

_ROOTLESS = """
import json, os, sys
from pytest_isolate.images import prepare_image
root = prepare_image(sys.argv[1], sys.argv[2])
print(json.dumps({name: [os.lstat(os.path.join(root, name)).st_uid,
                         oct(os.lstat(os.path.join(root, name)).st_mode & 0o7777)]
                  for name in ("home/user", "home/user/notes", "proc", "tmp")}))
"""


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="isolate-images-rootless-"))
    os.chown(path, 65534, 65534)
    yield path
    shutil.rmtree(path)


@requires("root")
def test_rootless_unpack_makes_every_file_the_callers(nobody_dir: Path) -> None:
    python = "/usr/bin/python3"
    filelock_dir = str(Path(str(filelock.__file__)).parents[1])
    if not os.path.exists(python):
        pytest.skip(f"{python} missing: the rootless run needs an interpreter nobody can read")
    image = write_tar(
        nobody_dir / "image.tar",
        [
            member("proc", "dir", mode=0o555),
            member("tmp", "dir", mode=0o1777),
            member("home/user", "dir", uid=1234, mode=0o500),
            member("home/user/notes", uid=1234, mode=0o400),
        ],
    )
    os.chown(image, 65534, 65534)
    cache = nobody_dir / "cache"
    result = subprocess.run(
        [python, "-c", _ROOTLESS, image, str(cache)],
        capture_output=True,
        text=True,
        user=65534,
        group=65534,
        extra_groups=[],
        cwd="/",
        env={"PYTHONPATH": f"{ROOT}:{filelock_dir}", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    if "No module named" in result.stderr:
        pytest.skip(f"{python} cannot import the project as nobody: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert {uid for uid, _ in seen.values()} == {65534}
    # Directories keep owner rwx rootless (so rm -rf can clear the cache); files keep modes.
    assert seen["home/user"][1] == "0o700" and seen["home/user/notes"][1] == "0o400"
    assert seen["proc"][1] == "0o755" and seen["tmp"][1] == "0o1777"
    removal = subprocess.run(
        ["rm", "-rf", str(cache)],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
    )
    assert removal.returncode == 0, removal.stderr


# -- damaged and odd archives --------------------------------------------------------------


def test_truncated_archive_is_reported_as_damaged(
    busybox_image: str, tmp_path: Path, cache: Path
) -> None:
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(Path(busybox_image).read_bytes()[:300_000])
    with pytest.raises(ImageError, match=r"is damaged: .*fix: download or build it again"):
        prepare_image(str(truncated), str(cache))
    assert cache_leftovers(cache) == []


def test_absurdly_deep_member_is_refused(tmp_path: Path, cache: Path) -> None:
    image = write_tar(tmp_path / "deep.tar", [member("a/" * 300 + "f")])
    with pytest.raises(ImageError, match=r"has 301 path components, more than the 256.*fix: "):
        prepare_image(image, str(cache))


def test_docker_save_layer_symlinked_out_of_the_archive_is_refused(
    tmp_path: Path, cache: Path
) -> None:
    manifest = json.dumps([{"RepoTags": ["a:1"], "Layers": ["x/layer.tar"]}]).encode()
    image = write_tar(
        tmp_path / "saved.tar",
        [
            member("x/layer.tar", "symlink", target="../../../../../etc/passwd"),
            member("manifest.json", data=manifest),
        ],
    )
    with pytest.raises(ImageError, match=r"layer 'x/layer.tar' named by its manifest is missing"):
        prepare_image(image, str(cache))
