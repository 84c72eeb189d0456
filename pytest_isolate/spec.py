"""The isolation spec: what one test's sandbox looks like, as plain data.

A spec is built once per test from four sources, low to high precedence:
built-in defaults < ini < command line < marker (the nearest marker wins per
option). Every value is parsed and validated here, before anything forks, so a
bad value never reaches the kernel. This module never imports pytest.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LAYERS",
    "OPTIONS",
    "Bind",
    "IsolationSpec",
    "Option",
    "SpecError",
    "format_size",
    "parse_size",
    "resolve_spec",
]

#: The layers of isolation, in the order the child applies them.
LAYERS = ("namespaces", "rootfs", "cgroup", "caps", "seccomp")


class SpecError(ValueError):
    """A value that cannot be turned into a spec; the message names the fix."""


@dataclass(frozen=True)
class Bind:
    """A host path granted inside the sandbox (read-only unless ``writable``)."""

    source: str
    target: str
    writable: bool = False


@dataclass(frozen=True)
class IsolationSpec:
    """Everything that decides how one test is isolated. Immutable and hashable,
    so plans derived from it can be cached per session."""

    enabled: bool = False
    timeout: float | None = None
    memory: int | None = None
    pids: int | None = None
    cpu: float | None = None
    caps_drop: tuple[str, ...] = ()
    caps_add: tuple[str, ...] = ()
    seccomp: bool = True
    net: str = "none"
    pod: str | None = None
    hostname: str = "isolated"
    fs: str = "readonly"
    rootfs: str | None = None
    binds: tuple[Bind, ...] = ()
    env: tuple[str, ...] | None = None
    strict: bool = False
    tmpfs_size: int = 512 * 1024 * 1024
    layers: tuple[str, ...] = LAYERS

    def has(self, layer: str) -> bool:
        return layer in self.layers

    def summary(self) -> str:
        """One line naming what applies, for ``-v`` and failure reports."""
        parts = [f"layers={','.join(self.layers) or 'fork-only'}"]
        for name in ("timeout", "memory", "pids", "cpu"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={format_size(value) if name == 'memory' else value}")
        if self.net != "none":
            parts.append(f"net={self.net}")
        if self.pod:
            parts.append(f"pod={self.pod}")
        if self.fs != "readonly":
            parts.append(f"fs={self.fs}")
        if self.rootfs:
            parts.append(f"rootfs={self.rootfs}")
        if self.caps_add:
            parts.append(f"caps_add={','.join(self.caps_add)}")
        if self.caps_drop:
            parts.append(f"caps_drop={','.join(self.caps_drop)}")
        if not self.seccomp:
            parts.append("seccomp=off")
        if self.strict:
            parts.append("strict")
        return " ".join(parts)


# --------------------------------------------------------------------------- parsers

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: object) -> int:
    """'100M', '1.5G', '512k', 1048576 -> bytes (binary units)."""
    if isinstance(value, bool):
        raise SpecError(f"invalid size {value!r}; use bytes or a K/M/G suffix, e.g. '256M'")
    if isinstance(value, int):
        if value <= 0:
            raise SpecError(f"invalid size {value!r}; it must be positive")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise SpecError(f"invalid size {value!r}; use bytes or a K/M/G suffix, e.g. '256M'")
    number, unit, _ = match.groups()
    size = int(float(number) * _SIZE_MULT[unit.lower()])
    if size <= 0:
        raise SpecError(f"invalid size {value!r}; it must be positive")
    return size


def format_size(size: float) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = {"GiB": 1024**3, "MiB": 1024**2, "KiB": 1024}[unit]
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SpecError(f"invalid boolean {value!r}; use true or false")


def _parse_seconds(value: object) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SpecError(f"invalid number of seconds {value!r}; e.g. 2.5") from None
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise SpecError(f"invalid number of seconds {value!r}; it must be a positive number")
    return seconds


def _parse_pids(value: object) -> int:
    try:
        pids: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise SpecError(f"invalid process count {value!r}; e.g. 64") from None
    if isinstance(value, bool) or pids < 1 or str(value).strip() != str(pids):
        raise SpecError(f"invalid process count {value!r}; use a whole number >= 1, e.g. 64")
    return pids


def _parse_cpu(value: object) -> float:
    try:
        cores = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SpecError(f"invalid CPU quota {value!r}; use cores, e.g. 0.5") from None
    if isinstance(value, bool) or not math.isfinite(cores) or not 0.01 <= cores <= 1024:
        raise SpecError(f"invalid CPU quota {value!r}; use cores between 0.01 and 1024, e.g. 0.5")
    return cores


def _parse_names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items: Iterable[object] = value.split(",")
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    else:
        raise SpecError(f"invalid list {value!r}; use a list of names, e.g. ['chown', 'net_raw']")
    names = []
    for item in items:
        if not isinstance(item, str):
            raise SpecError(f"invalid name {item!r} in {value!r}; names are strings")
        if item.strip():
            names.append(item.strip())
    return tuple(names)


def _parse_caps(value: object) -> tuple[str, ...]:
    # Imported lazily: the capability table lives with its layer.
    from .capabilities import normalize_cap_names

    return normalize_cap_names(_parse_names(value))


def _parse_net(value: object) -> str:
    text = str(value).strip().lower()
    if text not in ("none", "host"):
        raise SpecError(
            f"invalid network {value!r}; use 'none' (own namespace, loopback only) or 'host'"
        )
    return text


def _parse_hostname(value: object) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})", text):
        raise SpecError(
            f"invalid hostname {value!r}; use letters, digits, '-' and '.', <= 63 chars"
        )
    return text


def _parse_fs(value: object) -> str:
    text = str(value).strip().lower()
    if text not in ("readonly", "overlay"):
        raise SpecError(
            f"invalid fs {value!r}; use 'readonly' (host view read-only) or 'overlay' "
            "(everything writable, writes discarded)"
        )
    return text


def _parse_path(value: object) -> str:
    text = os.fspath(value)  # type: ignore[call-overload]
    if not isinstance(text, str) or not text:
        raise SpecError(f"invalid path {value!r}")
    return os.path.abspath(text)


def _parse_pod(value: object) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
        raise SpecError(f"invalid pod name {value!r}; use letters, digits, '_', '-', '.'")
    return text


def _parse_binds(value: object) -> tuple[Bind, ...]:
    if isinstance(value, str):
        entries: Iterable[object] = [e for e in value.split(",") if e.strip()]
    elif isinstance(value, (list, tuple)):
        entries = value
    else:
        raise SpecError(f"invalid binds {value!r}; use a list like ['/data:/data:ro']")
    binds = []
    for entry in entries:
        if isinstance(entry, Bind):
            binds.append(entry)
            continue
        parts = str(entry).strip().split(":")
        mode = "ro"
        # HOST:CONTAINER:MODE, HOST:MODE (a container path is absolute, so
        # never "ro" or "rw"), HOST:CONTAINER, HOST.
        if len(parts) == 3 or (len(parts) == 2 and parts[1] in ("ro", "rw")):
            mode = parts.pop()
        if not parts[0]:
            raise SpecError(f"invalid bind {entry!r}: no host path")
        # A relative host path is one below pytest's working directory, as
        # for the plugin's other paths (the project's .hypothesis, say); "~"
        # is the home directory (never a directory named "~" made there).
        parts[0] = os.path.abspath(os.path.expanduser(parts[0]))
        if len(parts) == 1:
            parts.append(parts[0])
        if len(parts) != 2 or mode not in ("ro", "rw"):
            raise SpecError(
                f"invalid bind {entry!r}; use 'HOST', 'HOST:ro', 'HOST:rw', 'HOST:CONTAINER', "
                "'HOST:CONTAINER:ro' or 'HOST:CONTAINER:rw'"
            )
        source, target = parts
        if not os.path.isabs(target):
            raise SpecError(
                f"invalid bind {entry!r}: the container path {target!r} must be absolute"
            )
        if os.path.normpath(target) == "/":
            raise SpecError(f"invalid bind {entry!r}: cannot bind over the container's /")
        binds.append(Bind(os.path.normpath(source), os.path.normpath(target), mode == "rw"))
    return tuple(binds)


def _parse_env(value: object) -> tuple[str, ...] | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "inherit")):
        return None
    names = _parse_names(value)
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\*?", name):
            raise SpecError(f"invalid environment variable name {name!r} in env allow-list")
    return names


def _parse_layers(value: object) -> tuple[str, ...]:
    names = _parse_names(value)
    if names == ("all",):
        return LAYERS
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        raise SpecError(f"unknown layer(s) {', '.join(unknown)}; valid: {', '.join(LAYERS)}, all")
    if "rootfs" in names and "namespaces" not in names:
        raise SpecError("layer 'rootfs' requires layer 'namespaces' (a new mount namespace)")
    return tuple(n for n in LAYERS if n in names)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One isolation option: its spec field, parser and the text shown to users."""

    name: str
    parse: Callable[[object], Any]
    help: str
    metavar: str = "VALUE"
    #: True when a bigger value loosens the sandbox (strict mode caps these).
    ceiling: bool = False

    @property
    def cli(self) -> str:
        return "--isolate-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "isolate_" + self.name


OPTIONS: tuple[Option, ...] = (
    Option(
        "timeout",
        _parse_seconds,
        "wall-clock seconds before the test's process tree is killed and its stack shown",
        "SECONDS",
        ceiling=True,
    ),
    Option(
        "memory",
        parse_size,
        "memory limit for the test's whole process tree, swap off (e.g. 256M, 1.5G)",
        "SIZE",
        ceiling=True,
    ),
    Option("pids", _parse_pids, "maximum number of processes and threads", "N", ceiling=True),
    Option("cpu", _parse_cpu, "CPU quota in cores (e.g. 0.5)", "CORES", ceiling=True),
    Option(
        "caps_drop",
        _parse_caps,
        "capabilities to remove from the default set (comma-separated, e.g. chown,net_raw; 'all')",
        "CAPS",
    ),
    Option(
        "caps_add",
        _parse_caps,
        "capabilities to grant beyond the default set (e.g. sys_admin)",
        "CAPS",
    ),
    Option("seccomp", _parse_bool, "apply the default syscall filter (true/false)", "BOOL"),
    Option("net", _parse_net, "network: 'none' (own namespace, loopback up) or 'host'", "MODE"),
    Option(
        "pod",
        _parse_pod,
        "join the network namespace of the named pod (see pytest_isolate.pod)",
        "NAME",
    ),
    Option("hostname", _parse_hostname, "hostname seen by the test", "NAME"),
    Option(
        "fs",
        _parse_fs,
        "file system view: 'readonly' host view, or 'overlay' (writable, writes discarded)",
        "MODE",
    ),
    Option(
        "rootfs",
        _parse_path,
        "run in another root file system: a directory, a "
        ".tar/.tar.gz/.tar.xz image, or a `docker save` / OCI layout tarball",
        "PATH",
    ),
    Option(
        "binds",
        _parse_binds,
        "host paths to grant: HOST[:CONTAINER][:ro|:rw], comma-separated",
        "BINDS",
    ),
    Option(
        "env", _parse_env, "environment allow-list (names, NAME* prefixes) or 'inherit'", "NAMES"
    ),
    Option(
        "strict",
        _parse_bool,
        "profile for untrusted code: no inherited fds, allow-listed "
        "environment, no capabilities, limits a marker cannot raise",
        "BOOL",
    ),
    Option(
        "tmpfs_size",
        parse_size,
        "size of the private /tmp, $HOME and /dev/shm when no memory limit bounds them",
        "SIZE",
    ),
    Option(
        "layers",
        _parse_layers,
        f"isolation layers to apply (diagnostics and benchmarks): {','.join(LAYERS)}, all or none",
        "LAYERS",
    ),
)
OPTIONS_BY_NAME = {opt.name: opt for opt in OPTIONS}

#: The environment a strict test sees when no allow-list was given.
STRICT_ENV = ("PATH", "LANG", "LC_*", "TERM", "TZ", "PYTHONHASHSEED", "PYTEST_*", "HOME")


def parse_option(name: str, value: object) -> Any:
    """Parse one option value; raises SpecError with a message naming the fix."""
    return OPTIONS_BY_NAME[name].parse(value)


def resolve_spec(
    *,
    base: Mapping[str, Any],
    marker_layers: Iterable[tuple[tuple[Any, ...], Mapping[str, Any]]],
    where: str,
) -> IsolationSpec:
    """Build a test's spec.

    ``base`` holds already-parsed values from defaults, ini and command line
    (``enabled`` included); ``marker_layers`` yields (args, kwargs) of the test's
    ``isolated`` markers, nearest first. Raises SpecError with ``where`` (the
    marker and the test id) in the message.
    """
    values: dict[str, Any] = dict(base)
    seen: set[str] = set()
    strict_ceiling = bool(base.get("strict"))
    for args, kwargs in marker_layers:
        if len(args) > 1 or (args and not isinstance(args[0], bool)):
            raise SpecError(
                f"isolated{_fmt_call(args, kwargs)} in {where}: the only positional argument "
                "is True or False, e.g. @pytest.mark.isolated(False); pass options by name"
            )
        if args and "enabled" not in seen:
            seen.add("enabled")
            if strict_ceiling and not args[0]:
                raise SpecError(
                    f"isolated(False) in {where}: strict mode (from the command line or ini) "
                    "does not let a marker turn isolation off"
                )
            values["enabled"] = args[0]
        elif "enabled" not in seen:
            seen.add("enabled")
            values["enabled"] = True
        for key, raw in kwargs.items():
            if key in seen:
                continue
            seen.add(key)
            if key not in OPTIONS_BY_NAME:
                raise SpecError(
                    f"isolated({key}=...) in {where}: unknown option {key!r}; valid options: "
                    f"{', '.join(sorted(OPTIONS_BY_NAME))}"
                )
            try:
                parsed = parse_option(key, raw)
            except SpecError as exc:
                raise SpecError(f"isolated({key}={raw!r}) in {where}: {exc}") from None
            if strict_ceiling:
                _check_strict(key, parsed, base, where)
            values[key] = parsed
    spec_fields = {f.name for f in dataclasses.fields(IsolationSpec)}
    spec = IsolationSpec(**{k: v for k, v in values.items() if k in spec_fields})
    return _finalize(spec, where)


def _check_strict(key: str, parsed: Any, base: Mapping[str, Any], where: str) -> None:
    """Strict mode set from the command line or ini is a ceiling: markers may
    tighten the sandbox, never loosen it."""
    option = OPTIONS_BY_NAME[key]
    ceiling = base.get(key)
    if option.ceiling:
        loosens = ceiling is not None and parsed > ceiling
    elif key == "binds":
        loosens = any(b.writable for b in parsed)
    elif key == "layers":
        loosens = bool(set(base.get("layers", LAYERS)) - set(parsed))
    else:
        loosens = {
            "caps_add": bool(parsed),
            "seccomp": not parsed,
            "net": parsed == "host",
            "strict": not parsed,
            "env": parsed is None,
        }.get(key, False)
    if loosens:
        shown = format_size(ceiling) if key == "memory" and ceiling else ceiling
        limit = f" beyond {shown}" if option.ceiling and ceiling is not None else ""
        raise SpecError(
            f"isolated({key}={parsed!r}) in {where}: strict mode (from the command line or "
            f"ini) forbids a marker to loosen {key!r}{limit}"
        )


def _finalize(spec: IsolationSpec, where: str) -> IsolationSpec:
    """Cross-option rules, checked once all sources are merged."""
    problems = []
    if spec.pod and spec.net == "host":
        problems.append(
            "pod= joins a pod's network namespace; it cannot be combined with net='host'"
        )
    if spec.has("rootfs") and not spec.has("namespaces"):
        problems.append("layer 'rootfs' requires layer 'namespaces'")
    if problems:
        raise SpecError(f"isolation options for {where}: " + "; ".join(problems))
    if spec.strict:
        # Strict mode: no capabilities at all and an allow-listed environment.
        spec = dataclasses.replace(
            spec,
            caps_drop=("ALL",),
            caps_add=(),
            seccomp=True,
            env=spec.env if spec.env is not None else STRICT_ENV,
        )
    return spec


def _fmt_call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    inner = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return "(" + ", ".join(inner) + ")"


def default_values() -> dict[str, Any]:
    """The built-in defaults as a mapping (the lowest layer of precedence)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(IsolationSpec)
        if f.default is not dataclasses.MISSING
    }
