"""Image tarballs as roots, through pytest: ``isolated(rootfs="busybox.tar.gz")``.

The busybox image is built once per session by the recipe in rootfs/. Real pytest
runs (pytester, in a subprocess) show that a test in the image reads the image's
own /etc/os-release, runs the image's shell and still imports the project; that a
malicious tarball is an error on that one test, naming the member and the rule,
with nothing written outside the cache; and that two xdist workers asking for the
same image at once unpack it once.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "rootfs" / "build-busybox-image.sh"
BUSYBOX = os.environ.get("BUSYBOX", "/bin/busybox")

IMAGE_SUITE = """
import os
import subprocess

import pytest

IMAGE = {image!r}


@pytest.mark.isolated(rootfs=IMAGE)
@pytest.mark.parametrize("n", range({count}))
def test_in_the_image(n):
    with open("/etc/os-release") as f:
        assert "ID=isolate-busybox" in f.read().splitlines()
    assert not os.path.exists("/etc/debian_version")  # the host's, not in the image
    shell = subprocess.run(["/bin/sh", "-c", "echo hi"], capture_output=True, text=True)
    assert (shell.returncode, shell.stdout) == (0, "hi\\n")
    assert os.path.realpath("/bin/sh") == "/bin/busybox"
    import project_module  # first imported here, inside the image root
    import wave  # the host's standard library, which pytest never imports

    assert project_module.ANSWER == 42
    assert wave.open
"""

# Records every unpack of every worker: the images layer logs one line per real unpack.
UNPACK_LOG_CONFTEST = """
import logging
import os

_handler = None


def pytest_configure(config):
    global _handler
    _handler = logging.FileHandler(os.environ["UNPACK_LOG"])
    _handler.setFormatter(logging.Formatter("%(process)d %(message)s"))
    logger = logging.getLogger("pytest_isolate.images")
    logger.setLevel(logging.INFO)
    logger.addHandler(_handler)


def pytest_unconfigure(config):
    logging.getLogger("pytest_isolate.images").removeHandler(_handler)
    _handler.close()
"""


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test image, built by the recipe in rootfs/."""
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} missing: apt-get install busybox-static (or set BUSYBOX)")
    output = tmp_path_factory.mktemp("image") / "busybox.tar.gz"
    result = subprocess.run([str(RECIPE), str(output)], capture_output=True, text=True, check=False)
    if result.returncode != 0 and "busybox-static" in result.stderr:
        pytest.skip(f"cannot build the busybox image: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return str(output)


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private image cache for the inner run (PYTEST_ISOLATE_CACHE/images)."""
    base = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE", str(base))
    return base / "images"


def unpacked_roots(cache: Path) -> list[str]:
    """Every unpack directory in the cache: finished roots and temporary ones."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.glob("*/rootfs*") if p.is_dir())


def cache_leftovers(cache: Path) -> list[str]:
    """Everything in the cache but hash indexes, lock files and per-image directories."""
    if not cache.exists():
        return []
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if not p.name.endswith(".lock") and p.name != "digests.json"
        if not (p.is_dir() and len(p.name) == 64)
    )


def test_test_in_the_busybox_image_reads_its_os_release_runs_its_shell_and_imports_the_project(
    pytester: pytest.Pytester, busybox_image: str, cache: Path
) -> None:
    pytester.makepyfile(project_module="ANSWER = 42\n")
    pytester.makepyfile(test_image=IMAGE_SUITE.format(image=busybox_image, count=2))
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "test_image.py::test_in_the_image[[]0[]] PASSED*",
            "test_image.py::test_in_the_image[[]1[]] PASSED*",
            "*= 2 passed in *",
        ]
    )
    assert result.ret == 0
    assert len([r for r in unpacked_roots(cache) if r.endswith("/rootfs")]) == 1


def hostile_tar(path: Path, members: list[tarfile.TarInfo]) -> str:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        ok = tarfile.TarInfo("etc/os-release")
        data = b"ID=evil\n"
        ok.size = len(data)
        tar.addfile(ok, io.BytesIO(data))
        for info in members:
            payload = b"pwned\n" if info.isfile() else b""
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload else None)
    return str(path)


def test_malicious_tarball_as_rootfs_is_an_error_on_that_test_and_writes_nothing_outside(
    pytester: pytest.Pytester, cache: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dotdot = tarfile.TarInfo("../../../../../../../../" + str(tmp_path / "escaped").lstrip("/"))
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    through = tarfile.TarInfo("link/pwned")
    images = {
        "dotdot": hostile_tar(tmp_path / "dotdot.tar", [dotdot]),
        "symlink": hostile_tar(tmp_path / "symlink.tar", [link, through]),
    }
    pytester.makepyfile(
        test_evil=f"""
        import pytest

        @pytest.mark.isolated(rootfs={images["dotdot"]!r})
        def test_dotdot():
            pass

        @pytest.mark.isolated(rootfs={images["symlink"]!r})
        def test_symlink_out():
            pass

        @pytest.mark.isolated
        def test_unaffected():
            pass
    """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_dotdot*",
            f"test_evil.py::test_dotdot: *image {images['dotdot']!r}: member '../*/escaped' has a "
            "'..' component, which could escape the image root; fix: *",
            "*ERROR at setup of test_symlink_out*",
            f"test_evil.py::test_symlink_out: *image {images['symlink']!r}: member 'link/pwned' "
            "lies under 'link', which is a symlink*; fix: *",
            "*= 1 passed, 2 errors in *",
        ]
    )
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
    assert result.ret == 1
    assert not (tmp_path / "escaped").exists()
    assert os.listdir(outside) == []
    assert cache_leftovers(cache) == []


def test_two_xdist_workers_using_the_same_image_unpack_it_once(
    pytester: pytest.Pytester,
    busybox_image: str,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    log = tmp_path / "unpack.log"
    monkeypatch.setenv("UNPACK_LOG", str(log))
    pytester.makeconftest(UNPACK_LOG_CONFTEST)
    pytester.makepyfile(project_module="ANSWER = 42\n")
    pytester.makepyfile(test_image=IMAGE_SUITE.format(image=busybox_image, count=8))
    result = pytester.runpytest_subprocess("-n", "2", "-v", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*[[]gw0[]]*PASSED*test_in_the_image*"])
    result.stdout.fnmatch_lines(["*[[]gw1[]]*PASSED*test_in_the_image*"])
    result.stdout.fnmatch_lines(["*= 8 passed in *"])
    # One "unpacked image" line per real unpack; a worker that found the other
    # one unpacking logs "waiting for another process" and unpacks nothing.
    lines = log.read_text().splitlines()
    assert sum(" unpacked image " in line for line in lines) == 1, lines
    assert len(unpacked_roots(cache)) == 1, unpacked_roots(cache)
