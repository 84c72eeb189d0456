"""pytest's side of an isolated test: prepare, release, collect, classify.

For each isolated item the engine
  1. sets up, in pytest's process, the collectors and fixtures of wider scope
     (once, inherited by every sandbox);
  2. takes the sandbox prepared while the previous test ran, if pytest's state
     is provably the one it was forked from, or spawns a new one;
  3. releases it, and right away prepares the next item's sandbox so that its
     fork, namespaces, root and cgroup placement overlap with this test;
  4. reads the reports, validates them (the child is untrusted) and turns every
     other ending into a readable failed report;
  5. tears down in pytest's process what the next item does not need.
"""

from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import functools
import gc
import os
import signal
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import pytest

from . import _pytest_compat as compat
from .capabilities import privileged
from .child import MAX_BASES, run_in_sandbox, silence_plugins
from .coverage_support import start_in_zygote
from .forkhooks import ForkHandlers, find_handlers
from .initd import InitFactory, InitFactoryError
from .prefault import Ranges, private_writable_mappings, written_ranges
from .protocol import Message
from .rootfs import STRICT_SYSTEM_DIRS, SYSTEM_DIRS, plan_rootfs, project_paths
from .sandbox import (
    SETUP_FAILED_EXIT,
    Sandbox,
    SandboxOutcome,
    SandboxPlan,
    born_flags,
    defer_after_fork,
    fork_born,
    fork_into_pid_namespace,
    init_setup,
    native_steps,
    prepare_zygote,
    spawn,
    start_sandbox,
)
from .scratchdirs import GENERATED, LockedDir
from .spec import IsolationSpec, SpecError, format_size
from .syscalls import fork_sibling
from .zygote import Zygote, ZygoteError

__all__ = ["Engine", "IsolationUnavailable"]

_PHASES = ("setup", "call", "teardown")
#: The most a test may send of each: reports logged during its phases
#: (subtests), failed subtests counted, junitxml suite properties.
_MAX_LOGGED = 1 << 20
#: The longest "file:line" a test's KeyboardInterrupt is reported at.
_MAX_WHERE = 4096
#: The directory below the session's temp base that is Python's temp
#: directory while wider fixtures are set up (Engine._shared_temp_dir).
SHARED_TEMPDIR = "isolate-tmp"
#: Pages a test process writes are learned from the first two sandboxes, then
#: from one in this many (the suite's tests change; the cost is ~7 ms each),
#: and only while tests run long enough to copy them ahead.
_RELEARN_EVERY = 16
#: At most this many pages (16 MiB) are copied ahead into a sandbox.
_PREFAULT_MAX_PAGES = 4096
#: ... and only while a test that ran at least this long (seconds) runs.
_PREFAULT_MIN_RUN = 0.010
#: A request to the zygote: the plan's id, the item's index, copy pages ahead,
#: the length of the pages learned since the zygote knew them (then the pages
#: as (start, length) pairs of 8-byte integers), the length of the cgroup v2
#: directory to fork into (then that path), then the cgroup's files.
_REQUEST = struct.Struct("<Qi?II")
#: Bytes of learned pages a request carries at most (zygote.py: 64 KiB a request).
_PAGES_SENT = 48 << 10
#: In a zygote: a descriptor of its own pid namespace (prepare_zygote, at its first
#: request; -1 in pytest's process).
_OWN_PIDNS = [-1]
#: In a zygote: pytest's capture descriptors (compat.capture_fds), found once.
_CAPTURE_FDS: set[int] = set()
#: In a zygote: what a test process calls right after the fork when the
#: zygote forks without Python's at-fork handlers (forkhooks.py), else None.
_AFTER_FORK: list[Callable[[], None] | None] = [None]


def _fork_from_zygote(
    into: str | None, flags: int, pid1_fds: tuple[int, int] | None
) -> int:  # pragma: no cover - in a zygote
    """fork_sibling(), the child born in its cgroup v2 directory ``into`` and
    (rootless) its namespaces ``flags`` where the kernel can (sandbox.fork_born;
    ``pid1_fds``: pid 1 may be the C one), and in the child what Python's
    at-fork handlers the zygote skipped leave to do (forkhooks.py)."""
    pid = fork_born(into, flags, fork_sibling, sibling=True, pid1_fds=pid1_fds)
    after = _AFTER_FORK[0]
    if pid == 0 and after is not None and not defer_after_fork(after):
        try:
            after()
        except BaseException:
            os._exit(SETUP_FAILED_EXIT)  # never back into the zygote's loop
    return pid


def _zygote_unavailable() -> str | None:
    """Why sandboxes are not forked by a zygote here (None: they are)."""
    if os.environ.get("PYTEST_ISOLATE_ZYGOTE", "1") == "0":
        return "PYTEST_ISOLATE_ZYGOTE=0"
    from .syscalls import sibling_fork_unavailable

    return sibling_fork_unavailable()


class IsolationUnavailable(Exception):
    """The host cannot give this test the isolation it asked for (names the fix)."""


@dataclass
class _Prepared:
    item: pytest.Item
    spec: IsolationSpec
    snapshot: tuple[int, ...]
    sandbox: Sandbox
    cgroup: Any
    #: Engine.results_epoch when it was forked.
    epoch: int = 0


#: Engine.counts key -> the InitFactory attribute it sums over the session.
_FACTORY_COUNTS = {
    "roots_copied": "copied",
    "sandboxes_reused": "reused",
    "reset_failures": "reset_failures",
    "init_failures": "init_failures",
}


class Engine:
    """One per pytest process (each xdist worker has its own)."""

    def __init__(self, config: pytest.Config, spec_for: Callable[[pytest.Item], IsolationSpec]):
        self.config = config
        self.spec_for = spec_for
        self.rootless = not privileged()
        self._plans: dict[IsolationSpec, SandboxPlan] = {}
        self._filters: dict[frozenset[str], bytes] = {}
        #: Sandboxes prepared for the next items, in their order (_prepare_next).
        self._prepared: list[_Prepared] = []
        self._live: list[Sandbox] = []
        self._finished: list[Sandbox] = []
        #: Reports the running test logged during its phases (take_logged).
        self._logged: list[tuple[str, pytest.TestReport]] = []
        self._graveyard: list[Sandbox] = []
        self._cgroup_of: dict[int, Any] = {}
        self._staging: LockedDir | None = None
        #: Files the sandboxes are shown (an /etc/hosts): beside the staging
        #: directory, on which each sandbox mounts a tmpfs of its own.
        self._generated: LockedDir | None = None
        #: Python's temp directory while wider fixtures are set up for an
        #: isolated test (_shared_temp_dir): "" until made, None if it cannot be.
        self._shared_tmp: str | None = ""
        #: Python's at-fork handler lists (forkhooks.py); False: not looked for yet.
        self._fork_handlers: ForkHandlers | Literal[False] | None = False
        self._project: dict[bool, list[str]] = {}
        self._index: dict[int, int] = {}
        self._cgroups: Any = None
        self._cgroup_error: str | None = None
        self._cgroups_opened = False
        self._init_factory: InitFactory | None = None
        self._hot_pages: Ranges = ()
        #: The learned pages the current zygote holds (sent when they change).
        self._pages_known: Ranges = ()
        #: Items before this index of session.items have their location computed.
        self._located = 0
        self._last_run = 0.0
        self._sandboxes_seen = 0
        self._init_factory_tried = False
        self._last_reset_failure = ""
        self._last_init_failure = ""
        #: A test called pytest.exit(): (message, returncode), raised after its reports.
        self.pending_exit: tuple[str, int] | None = None
        #: Where the last test raised KeyboardInterrupt (plugin.py stops the run).
        self.pending_interrupt: str | None = None
        self._deferred_teardown: tuple[pytest.Item, pytest.Item | None] | None = None
        self._var_scan: Callable[[], list[str]] | None = None
        #: Bumped whenever pytest's process runs setup or teardown code, or a
        #: test of its own: a zygote forked before then no longer matches it.
        #: Not for pytest's no-op setup and teardown of collectors
        #: (compat.quiet_setup, quiet_teardown): the setup stack is all they
        #: change, and a sandbox puts that right itself.
        self.generation = 0
        #: Moves on when pytest's process records a test's results where the
        #: next tests read them (results_recorded): sandboxes and zygotes
        #: forked before hold the old ones.
        self.results_epoch = 0
        #: For -vv's summary: sandboxes, by_zygote, zygotes, prepared.
        self.counts: collections.Counter[str] = collections.Counter()
        self._zygote: Zygote | None = None
        self._old_zygotes: list[Zygote] = []
        self._zygote_refused = 0
        self.zygote_unavailable: str | None = _zygote_unavailable()

    # ------------------------------------------------------------------ resources

    def cgroups(self) -> Any:
        if not self._cgroups_opened:
            self._cgroups_opened = True
            try:
                from .cgroups import open_cgroups

                self._cgroups = open_cgroups(owner_tag="pytest")
            except Exception as exc:  # CgroupUnavailable and host surprises alike
                self._cgroup_error = str(exc)
        return self._cgroups

    def _factory_count(self, key: str) -> int:
        """One of the init factory's counts (_FACTORY_COUNTS), over the session."""
        factory = self._init_factory
        live = getattr(factory, _FACTORY_COUNTS[key]) if factory is not None else 0
        return int(self.counts[key] + live)

    @property
    def roots_copied(self) -> int:
        """Sandboxes whose root was copied from their spec's template (initd)."""
        return self._factory_count("roots_copied")

    @property
    def sandboxes_reused(self) -> int:
        """Sandboxes handed out again after their init reset them (initd)."""
        return self._factory_count("sandboxes_reused")

    @property
    def reset_failures(self) -> tuple[int, str]:
        """Resets of sandboxes that failed (their init was killed instead),
        and the last reason."""
        factory = self._init_factory
        reason = factory.last_reset_failure if factory is not None else ""
        return self._factory_count("reset_failures"), reason or self._last_reset_failure

    @property
    def init_failures(self) -> tuple[int, str]:
        """Inits the factory could not make (pytest made those sandboxes
        itself; a template that failed is given up), and the last reason."""
        factory = self._init_factory
        reason = factory.last_init_failure if factory is not None else ""
        return self._factory_count("init_failures"), reason or self._last_init_failure

    def init_factory(self, wait: bool = True) -> InitFactory | None:
        """As root, started once: it makes each sandbox's pid 1, namespaces and
        root, so pytest forks a test once (see initd.py). ``wait=False``
        (warm_up) lets its interpreter start while pytest collects."""
        if not self._init_factory_tried and not self.rootless:
            self._init_factory_tried = True
            factory = InitFactory()
            try:
                factory.start(wait=wait)
            except InitFactoryError:
                factory.close()  # the sandboxes make their own init instead
            else:
                self._init_factory = factory
        return self._init_factory

    def warm_up(self) -> None:
        """When pytest is configured and every test is isolated: start what
        the first sandbox needs while pytest sets up its session and collects."""
        self.init_factory(wait=False)
        # Rootless, the /var scan runs in a fork on the idle second core. As
        # root that core starts the init factory's interpreter: a fork beside
        # it cost pytest more (its pages copied as it writes them, the two
        # cores oversubscribed) than the scan does in the first plan (7 ms
        # less a session, measured).
        if self._var_scan is None and self.rootless:
            from .rootfs import start_var_scan

            self._var_scan = start_var_scan()

    def _var_sockets(self) -> Callable[[], list[str]]:
        """The /var scan's result: from the helper warm_up() started, else
        scanned here once, by the first plan that asks."""
        if self._var_scan is None:
            from .rootfs import scan_once

            self._var_scan = scan_once()
        return self._var_scan

    def close(self) -> None:
        if self._var_scan is not None:
            with contextlib.suppress(OSError):
                self._var_scan()  # reaps the helper when no plan asked for it
        self.finish_item()
        # Prepared sandboxes first: each holds pytest's descriptors of its
        # own (its go pipe) until it ends.
        self._discard_prepared()
        self._retire_zygote()
        for zygote in self._old_zygotes:
            zygote.reap(block=True)
        self._old_zygotes.clear()
        self._bury(block=True)
        for sandbox in list(self._live):
            sandbox.close()
        self._live.clear()
        if self._init_factory is not None:
            for key, name in _FACTORY_COUNTS.items():
                self.counts[key] += getattr(self._init_factory, name)
            self._last_reset_failure = self.reset_failures[1]
            self._last_init_failure = self.init_failures[1]
            self._init_factory.close()
            self._init_factory = None
            self._init_factory_tried = False
        if self._cgroups is not None:
            with contextlib.suppress(Exception):
                self._cgroups.close()
        if self._staging is not None:
            self._staging.remove()
            self._staging = None
        if self._generated is not None:
            self._generated.remove()
            self._generated = None

    def merge_coverage(self) -> None:
        from . import child
        from .coverage_support import combine_into_session

        combine_into_session(child.COVERAGE_DIR)

    def _staging_dir(self) -> str:
        if self._staging is None:
            # An empty host directory the sandbox mounts its new root on (inside
            # its own mount namespace: the host never sees the mount), locked
            # while this session lives (a killed one's is removed by the next).
            self._staging = LockedDir("pytest-isolate-run-")
            os.mkdir(os.path.join(self._staging.path, "root"))
        return os.path.join(self._staging.path, "root")

    def _hosts_file(self, hostname: str) -> str | None:
        """The host's /etc/hosts plus the sandbox's hostname, for the
        sandboxes' /etc/hosts: code that resolves its own hostname
        (gethostbyname(gethostname()), getfqdn()) finds it, as on the host
        and in containers. A file of the session's own directory for such
        files (removed with it, or by the next session if this one is
        killed), never under a path a test can write to. None when it
        cannot be made."""
        if self._generated is None:
            try:
                self._generated = LockedDir("pytest-isolate-run-")
            except OSError:
                return None
        path = os.path.join(self._generated.path, f"{GENERATED}hosts-{hostname}")
        if not os.path.exists(path):
            try:
                with open("/etc/hosts", encoding="utf-8", errors="replace") as f:
                    text = f.read(1 << 20)
                text = text if text.endswith("\n") or not text else text + "\n"
                text += (
                    "# pytest-isolate: the sandbox's hostname\n"
                    f"127.0.0.1\t{hostname}\n::1\t{hostname}\n"
                )
                temporary = f"{path}.tmp"
                with open(temporary, "w", encoding="utf-8") as f:
                    f.write(text)
                os.chmod(temporary, 0o644)
                os.replace(temporary, path)
            except OSError:
                return None
        return path

    def _project_paths(self, strict: bool) -> list[str]:
        if strict not in self._project:
            targets = _collected_dirs(self.config)
            extra = [
                str(self.config.rootpath),
                str(self.config.invocation_params.dir),
                os.getcwd(),
                *targets,
            ]
            # /tmp, /var/tmp and $HOME are the sandbox's own (private and
            # writable), even when pytest runs there (its rootdir then too):
            # only what it collects below them is bound. Unless it collects
            # one of them whole: then that one is the project (run from
            # there, bound read-only over the sandbox's own).
            asked = {os.path.realpath(path) for path in targets}
            scratch = [
                path
                for path in ("/tmp", "/var/tmp", os.environ.get("HOME") or "")
                if path and os.path.realpath(path) not in asked
            ]
            # Strict shows fewer system directories (no /opt, no /var): what
            # Python needs from those is bound on its own.
            self._project[strict] = project_paths(
                extra, STRICT_SYSTEM_DIRS if strict else SYSTEM_DIRS, scratch
            )
        return self._project[strict]

    def plan_for(self, spec: IsolationSpec) -> SandboxPlan:
        plan = self._plans.get(spec)
        if plan is None:
            plan = self._plans[spec] = self._build_plan(spec)
        return plan

    def _build_plan(self, spec: IsolationSpec) -> SandboxPlan:
        from . import child
        from .coverage_support import prepare_dir

        if child.COVERAGE_DIR is None:
            child.COVERAGE_DIR = prepare_dir(compat.basetemp(self.config))
        namespaces = spec.has("namespaces")
        rootfs = None
        if namespaces and spec.has("rootfs"):
            writable = [p for p in (compat.basetemp(self.config),) if p]
            cgroups = self.cgroups()
            if cgroups is not None and not self._plans and spec.has("cgroup"):
                # The first test's sandbox is placed in its cgroup once this
                # plan is built, on the critical path: a move started now
                # spares it the kernel's wait (Trap 1 of docs/performance.md).
                cgroups.prime()
            image_root = None
            if spec.rootfs is not None:
                from .images import ImageError, default_cache_dir, prepare_image

                try:
                    image_root = prepare_image(spec.rootfs, default_cache_dir())
                except ImageError as exc:
                    raise IsolationUnavailable(str(exc)) from None
            for bind in spec.binds:
                if bind.writable and not os.path.lexists(bind.source):
                    # As Docker does: a writable grant of a path that is not
                    # there yet (the project's .hypothesis on a first run) is
                    # a directory made for it, by pytest's process.
                    try:
                        os.makedirs(bind.source, exist_ok=True)
                    except OSError as exc:
                        raise IsolationUnavailable(
                            f"the writable bind's host path {bind.source} does not exist and "
                            f"could not be made: {exc.strerror}"
                        ) from None
            rootfs = plan_rootfs(
                staging=self._staging_dir(),
                cwd=os.getcwd(),
                home=os.environ.get("HOME"),
                project=self._project_paths(spec.strict),
                binds=spec.binds,
                writable_paths=writable,
                tmpfs_size=spec.tmpfs_size,
                rootless=self.rootless,
                cgroup2=getattr(cgroups, "version", 0) == 2,
                overlay=spec.fs == "overlay",
                image_root=image_root,
                strict=spec.strict,
                var_sockets=self._var_sockets(),
                hosts=self._hosts_file(spec.hostname),
            )
        caps = None
        granted: frozenset[str] = frozenset()
        if spec.has("caps") and (namespaces or not self.rootless):
            from .capabilities import resolve_caps

            caps = resolve_caps(spec.caps_drop, spec.caps_add, rootless=self.rootless)
            granted = caps
        plan = SandboxPlan(
            namespaces=namespaces,
            rootless=self.rootless and namespaces,
            new_net=spec.net == "none" and spec.pod is None,
            pod_netns=None,
            hostname=spec.hostname,
            rootfs=rootfs,
            caps=caps,
            seccomp_program=None,
            env_allow=spec.env,
            strict_fds=spec.strict,
        )
        # What the factory makes for this plan does not depend on the filter:
        # it starts on the first sandbox's root while the rest is done here.
        setup = init_setup(plan) if spec.pod is None else None
        if setup is not None:
            factory = self.init_factory(wait=False)
            if factory is not None:
                factory.prepare(setup)
        if caps is not None:
            from .capabilities import _prctl

            # Load python-prctl's extension (and libcap.so.2) here, in pytest's
            # process: the sandbox needs it after pivot_root, where an image root
            # (rootfs=) has neither libcap nor, rootless, our site-packages.
            _prctl()
        program = None
        if spec.seccomp and spec.has("seccomp"):
            from .seccomp import build_filter, seccomp_available

            reason = seccomp_available()
            if reason:
                raise IsolationUnavailable(
                    f"the syscall filter is not available: {reason}; or run this test with "
                    "@pytest.mark.isolated(seccomp=False) / --isolate-seccomp=false"
                )
            program = self._filters.get(granted)
            if program is None:
                program = self._filters[granted] = build_filter(granted)
        if program:
            plan = dataclasses.replace(plan, seccomp_program=program)
        if native_steps():
            from .steps import compile_born, compile_secure, compile_setup

            plan = dataclasses.replace(
                plan,
                setup_program=compile_setup(plan),
                secure_program=compile_secure(plan),
                born_program=compile_born(plan),
            )
        return plan

    def _foreign_fds(self) -> set[int]:
        """pytest's descriptors a test process must not keep: other sandboxes'
        pipes and pidfds, and the channels to the init factory and the
        zygotes."""
        fds: set[int] = set()
        for sandbox in self._live:
            fds.update(sandbox.fds)
        if self._init_factory is not None:
            fds.update(self._init_factory.held_fds())
        for zygote in (self._zygote, *self._old_zygotes):
            if zygote is not None:
                fds.update(zygote.held_fds())
        return fds

    def _spawn(
        self,
        item: pytest.Item,
        spec: IsolationSpec,
        ahead: bool = False,
        prepared_from: pytest.Item | None = None,
    ) -> tuple[Sandbox, Any]:
        """A sandbox for ``item``. ``ahead``: it has the current test's run
        time to get ready, enough to copy ahead the pages it will write.
        ``prepared_from``: the item running now, when this one is prepared
        during its run (a new zygote may be started then)."""
        plan = self.plan_for(spec)
        if spec.pod is not None:
            from .pods import PodError, lookup_pod

            try:
                netns, userns = lookup_pod(spec.pod)
            except PodError as exc:
                raise IsolationUnavailable(str(exc)) from None
            plan = dataclasses.replace(plan, pod_netns=netns, pod_userns=userns)
        cgroup = None
        if spec.has("cgroup"):
            from .cgroups import CgroupUnavailable, Limits

            limits = Limits(memory=spec.memory, pids=spec.pids, cpu=spec.cpu)
            manager = self.cgroups()
            wants_limit = any(v is not None for v in (spec.memory, spec.pids, spec.cpu))
            if manager is not None:
                try:
                    manager.check(limits)
                    cgroup = manager.create(limits)
                except CgroupUnavailable as exc:
                    raise IsolationUnavailable(str(exc)) from None
            elif wants_limit:
                raise IsolationUnavailable(
                    f"this test asks for a resource limit but no usable cgroup was found: "
                    f"{self._cgroup_error}"
                )
        forker = self._forker(item, plan, cgroup, ahead, prepared_from)
        sandbox = self._fork(item, plan, cgroup, ahead, forker)
        if forker is not None and prepared_from is None:
            try:
                sandbox.resolve()  # needed now
            except OSError:
                # The zygote failed: pytest forks it, in the same cgroup.
                sandbox.set_cleanup(None)
                self._release(sandbox)
                sandbox = self._fork(item, plan, cgroup, ahead, None)
                forker = None
        # Forked by pytest's process in the item's own protocol: its copy of
        # the item is the item as it is now (compat.protocol_attrs).
        sandbox.item_current = forker is None and prepared_from is None
        self.counts["sandboxes"] += 1
        if cgroup is not None:
            self._cgroup_of[id(sandbox)] = cgroup
        return sandbox, cgroup

    def _fork(
        self,
        item: pytest.Item,
        plan: SandboxPlan,
        cgroup: Any,
        ahead: bool,
        forker: Callable[[list[int]], Callable[[], int]] | None,
    ) -> Sandbox:
        # Freeze what pytest's process holds so the sandbox's garbage collector
        # does not write to (copy, and be charged for) the whole inherited heap;
        # unfreeze right after so pytest's own cycles are still collected.
        gc.freeze()
        try:
            sandbox = spawn(
                plan,
                cgroup_procs=tuple(cgroup.procs_files) if cgroup else (),
                clone_into=cgroup.clone_into if cgroup else None,
                run_test=partial(run_in_sandbox, item),
                foreign_fds=self._foreign_fds,
                keep_fds=partial(compat.capture_fds, self.config),
                init_factory=self.init_factory() if plan.namespaces else None,
                cleanup=cgroup.remove if cgroup else None,
                prefault=self._hot_pages if ahead else (),
                forker=forker,
            )
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        finally:
            gc.unfreeze()
        self._live.append(sandbox)
        return sandbox

    # ------------------------------------------------------------------ the zygote

    def _forker(
        self,
        item: pytest.Item,
        plan: SandboxPlan,
        cgroup: Any,
        ahead: bool,
        prepared_from: pytest.Item | None,
    ) -> Callable[[list[int]], Callable[[], int]] | None:
        """The zygote that forks ``item``'s sandbox, if pytest's state is
        still the one it was forked in (zygote.py), or a new one when the
        sandbox is prepared during the test before (the state then holds
        until pytest's process runs setup or teardown code: crossing into
        another module whose collectors do nothing keeps it, see
        compat.quiet_setup). None: pytest forks."""
        if self.zygote_unavailable is not None:
            return None
        key = (self.generation, self.results_epoch)
        zygote = self._zygote
        if zygote is not None and (not zygote.alive or zygote.key != key):
            self._retire_zygote()
            zygote = None
        if zygote is None:
            if prepared_from is None:
                return None
            plans = {id(p): p for p in self._plans.values()}
            self._locate(item.session.items)
            if self._fork_handlers is False:
                # Once, in pytest's process: the zygote's gc.freeze() hides them.
                self._fork_handlers = find_handlers()
            zygote = Zygote(key, plans)
            try:
                zygote.start(partial(self._serve, plans, item.session), self._foreign_fds())
            except OSError:
                return None
            self._zygote = zygote
            self.counts["zygotes"] += 1
            self._pages_known = self._hot_pages
        index = self._index_of(item)
        if id(plan) not in zygote.plans or index < 0:
            return None  # a plan made since (a pod's, another spec's): not in its copy
        procs = tuple(cgroup.procs_files) if cgroup is not None else ()
        pages = b""
        if ahead and self._pages_known is not self._hot_pages:
            # Learned since the zygote was forked: it keeps them from now on.
            # At most _PAGES_SENT bytes (the request's bound): a best effort.
            flat = [n for r in self._hot_pages[: _PAGES_SENT // 16] for n in r]
            pages = array.array("Q", flat).tobytes()
            self._pages_known = self._hot_pages
        into = (cgroup.clone_into or "").encode() if cgroup is not None else b""
        payload = _REQUEST.pack(id(plan), index, ahead, len(pages), len(into)) + pages + into
        return partial(self._zygote_fork, zygote, payload + "\0".join(procs).encode())

    def _zygote_fork(self, zygote: Zygote, payload: bytes, fds: list[int]) -> Callable[[], int]:
        try:
            ticket = zygote.request(payload, fds)
        except ZygoteError:
            self._zygote_failed()
            raise

        def answer() -> int:
            try:
                pid = ticket()
            except ZygoteError:
                self._zygote_failed()
                raise
            self.counts["by_zygote"] += 1
            return pid

        return answer

    def _zygote_failed(self) -> None:
        self._zygote_refused += 1
        if self._zygote_refused >= 3:
            self.zygote_unavailable = "the zygote failed three times"
        self._retire_zygote()

    def _serve(
        self,
        plans: dict[int, SandboxPlan],
        session: pytest.Session,
        request: bytes,
        fds: list[int],
        own_socket: int,
    ) -> int:  # pragma: no cover - runs in the zygote
        """In the zygote: fork the sandbox a request describes. The zygote
        only forks (fork_into_pid_namespace); the child does the rest: each
        page the zygote writes is copied, in it, once per test (its children
        share its memory), and a test's own copy of that page once more."""
        plan_id, index, ahead, pages, into_size = _REQUEST.unpack_from(request)
        plan = plans[plan_id]
        if pages:  # learned since this zygote was forked (_forker)
            flat = array.array("Q", request[_REQUEST.size : _REQUEST.size + pages])
            self._hot_pages = tuple(zip(flat[::2], flat[1::2], strict=True))
        rest = _REQUEST.size + pages
        into = request[rest : rest + into_size].decode() or None
        # The seventh descriptor, if any: the factory's init (root) or the
        # pipe on which pid 1 says it has killed the rest (rootless, spawn).
        seventh = fds[6] if len(fds) > 6 else -1
        init_pidfd = -1 if plan.rootless else seventh
        killed_fd = seventh if plan.rootless else -1
        if _OWN_PIDNS[0] < 0:  # once per zygote
            _OWN_PIDNS[0] = prepare_zygote(plans.values())
            # What each test process would otherwise work out for itself:
            # pytest's capture descriptors, the plugins to silence.
            _CAPTURE_FDS.update(compat.capture_fds(self.config))
            silence_plugins(session)
            from . import child

            start_in_zygote(child.COVERAGE_DIR)
            if self._fork_handlers:
                _AFTER_FORK[0] = self._fork_handlers.quiet()
        # Rootless, pid 1 may be the C one (sandbox._spawn_native): it keeps
        # the results memfd and the kill pipe; not where the test's cgroup
        # is joined by a write (pid 1 would stay outside it). No object made
        # here: each page the zygote writes is copied once per test.
        joined_by_write = into is None and len(request) > rest + into_size
        pid1_fds = (fds[0], killed_fd) if plan.rootless and not joined_by_write else None
        pid = fork_into_pid_namespace(
            plan,
            init_pidfd,
            partial(_fork_from_zygote, into, born_flags(plan), pid1_fds),
            _OWN_PIDNS[0],
        )
        if pid == 0:
            try:
                procs = request[rest + into_size :].decode()
                item = session.items[index]
            except BaseException:
                os._exit(SETUP_FAILED_EXIT)  # never back into the zygote's loop
            start_sandbox(
                plan,
                fds[:6],
                init_pidfd,
                cgroup_procs=tuple(procs.split("\0")) if procs else (),
                run_test=partial(run_in_sandbox, item),
                keep_fds=_CAPTURE_FDS.copy,
                foreign=lambda: {own_socket, _OWN_PIDNS[0]} - {-1},
                prefault=self._hot_pages if ahead else (),
                killed_fd=killed_fd,
            )
        return pid

    def _retire_zygote(self) -> None:
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.close()
            self._old_zygotes.append(zygote)
        self._old_zygotes = [z for z in self._old_zygotes if not z.reap(block=False)]

    def _learning_due(self, sandbox: Sandbox) -> bool:
        """Every so often, a finished test process stays until pytest's process
        has noted which of its pages it wrote, for the next sandboxes to copy
        ahead (prefault.py). Only where the test process is pytest's own child
        (root, init factory), and while tests run long enough for pages to
        be copied ahead at all (_PREFAULT_MIN_RUN): reading a process's page map
        costs pytest's process several milliseconds."""
        if sandbox.init_pidfd < 0 or self._last_run < _PREFAULT_MIN_RUN:
            return False
        self._sandboxes_seen += 1
        return self._sandboxes_seen <= 2 or self._sandboxes_seen % _RELEARN_EVERY == 0

    def _learn_hot_pages(self, sandbox: Sandbox) -> None:
        pages = written_ranges(
            sandbox.pid, private_writable_mappings(), max_pages=_PREFAULT_MAX_PAGES
        )
        if pages:
            self._hot_pages = pages

    def _release(self, sandbox: Sandbox) -> None:
        self._cgroup_of.pop(id(sandbox), None)
        sandbox.close()
        with contextlib.suppress(ValueError):
            self._live.remove(sandbox)

    def _discard_prepared(self) -> None:
        prepared, self._prepared = self._prepared, []
        for entry in prepared:
            self._release(entry.sandbox)

    def _locate(self, items: list[pytest.Item]) -> None:
        """Compute (and so cache) the items' locations before a zygote is
        forked. pytest computes an item's location in its own process when
        the item starts (the log line); a test process whose zygote lacks it
        computes it again for its reports (~0.2 ms a test, and the pages it
        writes doing so), then throws it away."""
        for item in items[self._located :]:
            with contextlib.suppress(Exception):
                item.location  # noqa: B018 - a cached property, computed for its side effect
        self._located = max(self._located, len(items))

    def _index_of(self, item: pytest.Item | None) -> int:
        if item is None:
            return -1
        items = item.session.items
        if len(self._index) != len(items):
            self._index = {id(it): i for i, it in enumerate(items)}
        return self._index.get(id(item), -1)

    # ------------------------------------------------------------------ the protocol

    def run(
        self, item: pytest.Item, nextitem: pytest.Item | None, spec: IsolationSpec
    ) -> list[pytest.TestReport]:
        """runtestprotocol for one isolated item; returns its reports in order
        (and keeps those it logged during its phases: take_logged)."""
        self._logged = []
        compat.init_request(item)
        if not compat.shared_ready(item):
            if not compat.quiet_setup(item):
                self.generation += 1
            # Passed, its report is dropped (the sandbox makes the test's
            # setup report): only a failure's goes through the hook.
            with self._shared_temp_dir():
                setup = compat.call_in_phase(
                    item, "setup", partial(compat.setup_shared, item), hooks_if_passed=False
                )
            if not setup.passed:
                self._discard_prepared()
                return [setup, self._teardown(item, nextitem, None, hooks=True)]
        compat.note_protocol_filters(item)
        try:
            sandbox, cgroup = self._take_or_spawn(item, spec)
        except Exception as exc:  # never INTERNALERROR: an error on this test
            report = self._report(item, "setup", _setup_error_text(item, exc), spec=spec)
            return [report, self._teardown(item, nextitem, None)]
        learn = self._learning_due(sandbox)
        carried = b"" if sandbox.item_current else compat.protocol_attrs(item)
        sandbox.go(struct.pack("<i", self._index_of(nextitem)) + carried, linger=learn)
        self._prepare_next(item, nextitem)
        # While the test runs: reap the sandboxes killed before it and remove
        # their cgroups (on v1 each rmdir can wait for the kernel).
        self._bury(block=False)
        try:
            outcome = sandbox.collect(spec.timeout, keep=learn)
        except KeyboardInterrupt:
            self._release(sandbox)
            raise
        if learn:
            self._learn_hot_pages(sandbox)
            sandbox.kill()
        stats = None
        if cgroup is not None:
            with contextlib.suppress(OSError):
                stats = cgroup.stats()
        out, err = _read(sandbox.out_fd), _read(sandbox.err_fd)
        # Released after the reports are logged (finish_item), so the sandbox's
        # exit overlaps with pytest's reporting; before the next test starts.
        self._finished.append(sandbox)
        reports = self._interpret(item, nextitem, spec, outcome, stats, out, err)
        self._last_run = _run_time(reports)
        return reports

    @contextlib.contextmanager
    def _shared_temp_dir(self) -> Iterator[None]:
        """Around the setup of an isolated test's wider fixtures: Python's
        temp directory (``tempfile.tempdir``) is ``<basetemp>/isolate-tmp``,
        which every sandbox sees, writable, at the same path. A fixture that
        makes a directory for the tests with ``tempfile.mkdtemp()`` (a
        zoneinfo cache, a socket) made it in the host's ``/tmp`` before,
        which no sandbox sees: each has a private ``/tmp``. Only then: tests
        that run in pytest's process, and the sandboxes, keep ``/tmp`` (the
        session's temp base is private to its user, which a test handing a
        path to another user would notice). Not the ``TMPDIR`` of processes
        started meanwhile: only Python's own choice. Made once a session."""
        if self._shared_tmp == "":
            basetemp = compat.basetemp(self.config)
            self._shared_tmp = None
            if basetemp is not None:
                shared = os.path.join(basetemp, SHARED_TEMPDIR)
                with contextlib.suppress(OSError):
                    os.makedirs(shared, exist_ok=True)
                    self._shared_tmp = shared
        if self._shared_tmp is None:
            yield
            return
        own, tempfile.tempdir = tempfile.tempdir, self._shared_tmp
        try:
            yield
        finally:
            tempfile.tempdir = own

    def results_recorded(self) -> None:
        """pytest's process recorded a test's results where later tests read
        them (pytest-dependency's managers, compat.record_dependency_results):
        the prepared sandbox and the zygote hold the state before, so the
        next sandbox is forked from the state now."""
        self.results_epoch += 1

    def finish_protocol(self, item: pytest.Item) -> pytest.TestReport | None:
        """After every attempt at ``item``: the teardown deferred for reruns."""
        deferred, self._deferred_teardown = self._deferred_teardown, None
        if deferred is None or deferred[0] is not item:
            return None
        self.generation += 1
        report = compat.call_in_phase(
            item, "teardown", partial(compat.teardown_shared, item, deferred[1]), hooks=False
        )
        return report if report.failed else None

    def finish_item(self) -> None:
        """Nothing of a test outlives it into the next one. With a cgroup, every
        process of the finished sandbox gets SIGKILL directly (so none runs
        another instruction of user code) and the kernel's teardown is reaped
        later, off the hot path; without one, pid 1 does the same when asked
        (Sandbox.stopped), or else wait until its pid namespace has ended
        (rootless, the process outside it, ours, is reaped later) or,
        without a namespace, until it is gone."""
        finished, self._finished = self._finished, []
        for sandbox in finished:
            cgroup = self._cgroup_of.get(id(sandbox))
            if cgroup is None:
                if sandbox.stopped() or sandbox.wait_namespace_gone():
                    self._graveyard.append(sandbox)
                else:
                    self._release(sandbox)
                continue
            sandbox.kill()
            try:
                cgroup.signal_all(sandbox.signalled_pids())
            except OSError:
                self._release(sandbox)  # cannot list its members: wait instead
            else:
                self._graveyard.append(sandbox)

    def _bury(self, block: bool) -> None:
        """Reap killed sandboxes and remove their cgroups once the kernel is done."""
        waiting = []
        for sandbox in self._graveyard:
            if block or sandbox.is_gone():
                self._release(sandbox)
            else:
                waiting.append(sandbox)
        self._graveyard = waiting

    def _take_or_spawn(self, item: pytest.Item, spec: IsolationSpec) -> tuple[Sandbox, Any]:
        if self._prepared:
            prepared = self._prepared.pop(0)
            with contextlib.suppress(OSError):  # not forked at all: pid -1, released below
                prepared.sandbox.resolve()
            if (
                prepared.item is item
                and prepared.spec == spec
                and prepared.epoch == self.results_epoch
                and compat.shared_snapshot(item) == prepared.snapshot
                and prepared.sandbox.pid > 0
            ):
                self.counts["prepared"] += 1
                return prepared.sandbox, prepared.cgroup
            # Not this item's, or pytest's state moved: those prepared after
            # it were predicted from the same state, in the same order.
            self._release(prepared.sandbox)
            self._discard_prepared()
        return self._spawn(item, spec)

    def _prepare_next(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """Fork the next item's sandbox now, while this test runs, when pytest's
        state for it is already known: getting to the next item runs no code
        in pytest's process (same parent, or collectors without finalizers or
        setup code between them) and every wider fixture it needs is cached.
        The state is checked again before the sandbox is used.

        Rootless, the one after it too, when pytest runs its items in order
        (not an xdist worker) and all three share a parent: a rootless sandbox
        takes longer to make (its user namespace, the root it builds itself)
        than a short test takes to run, and with one prepared at a time the
        making, not the machine, set the pace (docs/performance.md)."""
        if nextitem is None or self.config.getoption("usepdb", False):
            return
        if not self._prepared:
            spec = self._preparable(nextitem)
            snapshot = compat.predicted_snapshot(item, nextitem) if spec is not None else None
            if spec is None or snapshot is None:
                return
            if not self._prepare(item, nextitem, spec, snapshot):
                return
        if len(self._prepared) != 1 or self._prepared[0].item is not nextitem:
            return
        if not self.plan_for(self._prepared[0].spec).rootless:
            return
        if hasattr(self.config, "workerinput"):
            return  # an xdist worker: its next items come from the controller
        items = item.session.items
        index = self._index_of(nextitem)
        if index < 1 or index + 1 >= len(items) or items[index - 1] is not item:
            return  # not pytest's own loop over its items
        after = items[index + 1]
        if not (after.parent is nextitem.parent is item.parent):
            return
        spec = self._preparable(after)
        snapshot = compat.shared_snapshot(after) if spec is not None else None
        if spec is not None and snapshot is not None:
            self._prepare(item, after, spec, snapshot)

    def _preparable(self, item: pytest.Item) -> IsolationSpec | None:
        """``item``'s spec, if a sandbox can be prepared for it ahead."""
        try:
            spec = self.spec_for(item)
        except SpecError:
            return None
        if not spec.enabled or compat.evaluate_skip(item):
            return None
        return spec

    def _prepare(
        self,
        running: pytest.Item,
        item: pytest.Item,
        spec: IsolationSpec,
        snapshot: tuple[int, ...],
    ) -> bool:
        try:
            # Copying pages ahead takes CPU time: worth it when the current
            # test leaves time for it (the last one did), not in a burst of
            # tiny tests where every core is busy anyway.
            # Not under a memory limit: the copies count against it.
            ahead = self._last_run >= _PREFAULT_MIN_RUN and spec.memory is None
            sandbox, cgroup = self._spawn(item, spec, ahead=ahead, prepared_from=running)
        except Exception:
            return False  # it fails again, with a report, when its turn comes
        self._prepared.append(_Prepared(item, spec, snapshot, sandbox, cgroup, self.results_epoch))
        return True

    def _teardown(
        self,
        item: pytest.Item,
        nextitem: pytest.Item | None,
        child: pytest.TestReport | None,
        *,
        hooks: bool = False,
    ) -> pytest.TestReport:
        """The teardown report: the sandbox's, merged with the teardown of
        wider fixtures in pytest's process. ``hooks`` only when the setup
        report was also made through pytest_runtest_makereport here."""
        if compat.reruns_expected(item):
            # Another attempt may follow: the wider fixtures stay up until
            # pytest_runtest_protocol is over (finish_protocol).
            self._deferred_teardown = (item, nextitem)
            if child is not None:
                return child
            return compat.call_in_phase(item, "teardown", lambda: None, hooks=hooks)
        if child is not None and nextitem is not None and nextitem.parent is item.parent:
            return child  # pytest's process has nothing to tear down before a sibling
        if not compat.quiet_teardown(nextitem, item.session):
            self.generation += 1
        parent = compat.call_in_phase(
            item, "teardown", partial(compat.teardown_shared, item, nextitem), hooks=hooks
        )
        if child is None:
            return parent
        if parent.failed and not child.failed:
            parent.sections = [*child.sections, *parent.sections]
            return parent
        if parent.failed:
            child.sections.append(
                ("teardown of wider fixtures in pytest's process", str(parent.longrepr))
            )
        return child

    # ------------------------------------------------------------------ results

    def _interpret(
        self,
        item: pytest.Item,
        nextitem: pytest.Item | None,
        spec: IsolationSpec,
        outcome: SandboxOutcome,
        stats: Any,
        out: str,
        err: str,
    ) -> list[pytest.TestReport]:
        reports: list[pytest.TestReport] = []
        problem: str | None = None
        done = False
        setup_failure: dict[str, Any] | None = None
        exit_request: tuple[str, int] | None = None
        interrupted: str | None = None
        kept: object = None
        for msg in outcome.messages:
            if msg.type == "report":
                report, problem = self._accept_report(item, msg, reports)
                if report is not None:
                    reports.append(report)
            elif msg.type == "logreport":
                report, problem = self._accept_logged(item, msg)
                if report is not None:
                    self._logged.append((_next_phase(reports, item), report))
            elif msg.type == "suite_properties":
                problem = _add_suite_properties(self.config, msg.payload)
            elif msg.type == "subtests_failed":
                count = msg.payload
                if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                    compat.add_failed_subtests(item, min(count, _MAX_LOGGED))
            elif msg.type == "warning":
                problem = _replay_warning(item, msg.payload)
            elif msg.type == "done":
                done = True
            elif msg.type == "setup_failed" and isinstance(msg.payload, dict):
                setup_failure = msg.payload
            elif msg.type == "rerun_state":
                problem = compat.apply_rerun_state(item, msg.payload)
            elif msg.type == "kept_reports":
                kept = msg.payload
                problem = compat.check_report_refs(kept)
            elif msg.type == "allure_written":
                compat.drop_allure_result(item)
            elif msg.type == "interrupted" and isinstance(msg.payload, dict):
                interrupted = str(msg.payload.get("where", "?"))[:_MAX_WHERE]
            elif msg.type == "session_exit" and isinstance(msg.payload, dict):
                exit_request = (
                    str(msg.payload.get("msg", "")),
                    _int(msg.payload.get("returncode"), 1),
                )
            if problem:
                break
        if outcome.protocol_error and not problem:
            problem = outcome.protocol_error
        phase = _next_phase(reports, item)
        oom = bool(stats and stats.oom_kills)
        text: str | None = None
        if problem:
            text = f"the isolated test sent a malformed result: {problem}"
        elif outcome.timed_out:
            text = (
                f"Timeout: the test ran longer than its timeout of {spec.timeout:g} s; its "
                "whole process tree was killed."
            )
            if outcome.stack:
                text += "\n\n" + outcome.stack.rstrip()
        elif setup_failure is not None:
            text = _setup_failure_text(setup_failure)
        elif not done and phase != "done":
            text = _crash_text(outcome, spec, stats, oom)
        if text is not None and phase != "done":
            assert phase in _PHASES
            sections = _output_sections(phase, out, err)
            reports.append(
                self._report(
                    item, phase, text, spec=spec, sections=sections, duration=outcome.duration
                )
            )
        elif text is not None:
            # Every report arrived but the end was not clean: note it on teardown.
            reports[-1].sections.append(("isolation", text))
        if oom and text is None and reports:
            reports[-1].sections.append(
                (
                    "isolation",
                    f"the kernel's OOM killer ended {stats.oom_kills} process(es) "
                    "of this test (its memory limit is "
                    f"{format_size(spec.memory) if spec.memory else 'unset'})",
                )
            )
        if interrupted is not None and text is None:
            # As pytest: the phases logged so far, no teardown (the wider
            # fixtures are torn down as the session ends), and the run stops.
            self.pending_interrupt = interrupted
            if reports:  # none when it came from the setup
                _annotate(reports, spec, stats)
            return reports
        child_teardown = reports.pop() if reports and reports[-1].when == "teardown" else None
        if kept is not None and problem is None:
            # Before the wider fixtures' teardown, which may read them.
            compat.apply_report_refs(item, kept, {r.when: r for r in reports})
        reports.append(self._teardown(item, nextitem, child_teardown))
        if kept is not None and problem is None:
            compat.apply_report_refs(item, kept, {r.when: r for r in reports})
        _annotate(reports, spec, stats)
        if exit_request is not None:
            self.pending_exit = exit_request
        return reports

    def _accept_report(
        self, item: pytest.Item, msg: Message, reports: list[pytest.TestReport]
    ) -> tuple[pytest.TestReport | None, str | None]:
        data = msg.payload
        if not isinstance(data, dict) or data.get("$report_type") != "TestReport":
            return None, "a report frame does not hold a TestReport"
        report, problem = self._rebuild(item, data)
        if report is None:
            return None, problem
        if report.when != _next_phase(reports, item):
            return None, f"a {report.when!r} report arrived out of order"
        return _lean_copy(report, item), None

    def _accept_logged(
        self, item: pytest.Item, msg: Message
    ) -> tuple[pytest.TestReport | None, str | None]:
        """A report logged during a phase (a subtest's): rebuilt by whichever
        plugin made it (pytest_report_from_serializable), kept as it is."""
        data = msg.payload
        if not isinstance(data, dict):
            return None, "a logged report is not an object"
        if len(self._logged) >= _MAX_LOGGED:
            return None, f"logged more than {_MAX_LOGGED} reports"
        report, problem = self._rebuild(item, data)
        if report is not None:
            compat.keep_subtest_values(report, data)
        return report, problem

    def take_logged(self) -> list[tuple[str, pytest.TestReport]]:
        """The reports the last test logged during its phases, each with the
        phase it came in, in order; pytest's process logs them (plugin.py)."""
        logged, self._logged = self._logged, []
        return logged

    def _rebuild(
        self, item: pytest.Item, data: dict[str, Any]
    ) -> tuple[pytest.TestReport | None, str | None]:
        # JSON has no tuples; pytest expects them where execnet would keep them.
        for key in ("location", "longrepr"):
            value = data.get(key)
            if isinstance(value, list) and len(value) == 3:
                data[key] = tuple(value)
        if isinstance(data.get("sections"), list):
            data["sections"] = [tuple(s) if isinstance(s, list) else s for s in data["sections"]]
        try:
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
        except Exception as exc:
            return None, f"a report could not be rebuilt ({type(exc).__name__}: {exc})"
        if not isinstance(report, pytest.TestReport) or report.nodeid != item.nodeid:
            return None, f"a report names another test ({getattr(report, 'nodeid', None)!r})"
        if report.when not in _PHASES:
            return None, f"a report has the phase {report.when!r}"
        if report.outcome not in ("passed", "failed", "skipped"):
            return None, f"a report has the outcome {report.outcome!r}"
        return report, None

    def _report(
        self,
        item: pytest.Item,
        when: Literal["setup", "call", "teardown"],
        text: str,
        *,
        spec: IsolationSpec | None,
        sections: list[tuple[str, str]] | None = None,
        duration: float = 0.0,
    ) -> pytest.TestReport:
        now = time.time()
        return pytest.TestReport(
            item.nodeid,
            item.location,
            {k: 1 for k in item.keywords},
            "failed",
            text,
            when,
            sections=sections or [],
            duration=duration,
            start=now - duration,
            stop=now,
            user_properties=list(getattr(item, "user_properties", [])),
        )


# --------------------------------------------------------------------------- helpers


#: TestReport.__init__'s own fields; anything else a report carries is an extra.
_REPORT_FIELDS = frozenset(
    {
        "nodeid",
        "_id",
        "location",
        "keywords",
        "outcome",
        "longrepr",
        "when",
        "sections",
        "duration",
        "start",
        "stop",
        "user_properties",
        "$report_type",
    }
)


def _lean_copy(report: pytest.TestReport, item: pytest.Item) -> pytest.TestReport:
    """The report as pytest's process would have made it: sharing the item's
    node id, location and keyword names (checked equal), canonical outcome and
    phase strings, and no ``$report_type`` attribute (which turned every rebuilt
    report's attribute dict into a larger, unshared one). pytest keeps every
    report until the session ends: decoded copies were most of the per-test
    memory growth of pytest's process."""
    extras = {k: v for k, v in vars(report).items() if k not in _REPORT_FIELDS}
    location = item.location if tuple(report.location) == tuple(item.location) else report.location
    keywords = {
        sys.intern(k) if isinstance(k, str) else k: v for k, v in dict(report.keywords).items()
    }
    return pytest.TestReport(
        item.nodeid,
        location,
        keywords,
        _CANONICAL.get(report.outcome, report.outcome),
        report.longrepr,
        _CANONICAL.get(report.when, report.when),
        report.sections,
        report.duration,
        report.start,
        report.stop,
        report.user_properties,
        **extras,
    )


_CANONICAL: dict[str, Any] = {
    s: s for s in ("passed", "failed", "skipped", "setup", "call", "teardown")
}


def _read(fd: int) -> str:
    from .sandbox import read_memfd

    try:
        return read_memfd(fd)
    except OSError:
        return ""


def _run_time(reports: list[pytest.TestReport]) -> float:
    """How long a test ran: its phases' durations, timed in the test process
    (or by us for a phase it did not finish). Not the time from "go" to its
    last report, which includes pytest's own work meanwhile (preparing the
    next sandbox: ~5 ms with both cores busy, so a trivial test seemed to run
    long enough to copy pages ahead for the next). Whatever the test sent,
    this only decides whether pages are copied ahead (in its own cgroup)."""
    total = 0.0
    for report in reports:
        duration = report.duration
        if isinstance(duration, (int, float)) and 0 <= duration < 1e6:
            total += duration
    return total


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _collected_dirs(config: pytest.Config) -> list[str]:
    """The directories pytest was asked to collect (its arguments, or
    testpaths, or the invocation directory), a file's being its directory."""
    found = []
    for arg in config.args:
        path = os.path.join(str(config.invocation_params.dir), str(arg).split("::", 1)[0])
        if os.path.isdir(path):
            found.append(os.path.abspath(path))
        elif os.path.exists(path):
            found.append(os.path.dirname(os.path.abspath(path)))
    return found


def _add_suite_properties(config: pytest.Config, payload: Any) -> str | None:
    """junitxml's suite properties a test recorded (record_testsuite_property),
    added to pytest's; a problem, if they are not pairs of strings."""
    properties = compat.suite_properties(config)
    if properties is None:
        return None
    if (
        not isinstance(payload, list)
        or len(payload) > _MAX_LOGGED
        or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            for pair in payload
        )
    ):
        return "junitxml suite properties that are not pairs of strings"
    properties.extend((name, value) for name, value in payload)
    return None


def _next_phase(
    reports: list[pytest.TestReport], item: pytest.Item
) -> Literal["setup", "call", "teardown", "done"]:
    if not reports:
        return "setup"
    last = reports[-1]
    if last.when == "setup":
        if last.passed and not item.config.getoption("setuponly", False):
            return "call"
        return "teardown"
    if last.when == "call":
        return "teardown"
    return "done"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _crash_text(outcome: SandboxOutcome, spec: IsolationSpec, stats: Any, oom: bool) -> str:
    if oom:
        limit = format_size(spec.memory) if spec.memory else "unset"
        peak = format_size(stats.peak_memory) if stats.peak_memory else "unknown"
        return (
            f"MemoryError-like: test exceeded its memory limit of {limit} (peak {peak}); "
            "the kernel's OOM killer ended it. Raise it with "
            "@pytest.mark.isolated(memory=...) or --isolate-memory"
        )
    status = outcome.test_status
    if status is None:
        status = outcome.wait_status
    if status is None:
        return "the isolated test ended without reporting a result"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        extra = ""
        if sig == signal.SIGKILL and spec.pids:
            extra = " (nothing in the kernel's counters says why; another process may have sent it)"
        return f"the test process was killed by {_signal_name(sig)} ({sig}){extra}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    if outcome.test_status is None and code == SETUP_FAILED_EXIT:
        return "the sandbox failed during setup without saying why"
    return (
        f"the test process exited with status {code} before reporting a result "
        "(os._exit() or a C library's exit() in the test)"
    )


def _setup_failure_text(payload: dict[str, Any]) -> str:
    step = str(payload.get("step", "?"))
    error = str(payload.get("error", "?"))
    return (
        f"isolation setup failed at step '{step}': {error}\n"
        "Run `python -m pytest_isolate doctor` to see what this host supports; "
        "docs/troubleshooting.md lists each setup error and its fix."
    )


def _setup_error_text(item: pytest.Item, exc: BaseException) -> str:
    if isinstance(exc, (SpecError, IsolationUnavailable)):
        return f"{item.nodeid}: {exc}"
    if isinstance(exc, OSError):
        return f"{item.nodeid}: could not start the sandbox: {exc}"
    return f"{item.nodeid}: could not start the sandbox: {type(exc).__name__}: {exc}"


def _output_sections(phase: str, out: str, err: str) -> list[tuple[str, str]]:
    sections = []
    if out:
        sections.append((f"Captured stdout {phase}", out))
    if err:
        sections.append((f"Captured stderr {phase}", err))
    return sections


def _known_warning_class(name: object) -> type[Warning] | None:
    """The warning class ``name`` ("module.QualName") names, if pytest's
    process has it: looked up in the modules already imported, never by
    importing one or running a module's ``__getattr__`` (the name comes from
    the sandbox)."""
    if not isinstance(name, str) or len(name) > 1000:
        return None
    module_name, _, qualname = name.rpartition(".")
    found: object = None
    # The longest imported module the name starts with; the rest is the
    # class's qualified name (classes nested in classes included).
    while module_name:
        module = sys.modules.get(module_name)
        if module is not None:
            found = module
            for part in qualname.split("."):
                found = vars(found).get(part) if hasattr(found, "__dict__") else None
            break
        module_name, _, head = module_name.rpartition(".")
        qualname = f"{head}.{qualname}"
    if isinstance(found, type) and issubclass(found, Warning):
        return found
    return None


def _warning_instance(category: type[Warning], message: str) -> tuple[type[Warning], Warning]:
    """``category(message)``, or where its constructor wants more than a
    message (or its instance cannot be printed), the nearest base whose
    constructor takes one."""
    for base in category.__mro__:
        if isinstance(base, type) and issubclass(base, Warning):
            try:
                instance = base(message)
                str(instance)  # pytest's summary prints it
            except Exception:
                continue
            return base, instance
    return UserWarning, UserWarning(message)


def _replay_warning(item: pytest.Item, payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return "a warning frame is not an object"
    message = str(payload.get("message", ""))[:10000]
    names = [payload.get("category")]
    bases = payload.get("bases")
    if isinstance(bases, list):
        names.extend(bases[:MAX_BASES])
    category = next(
        (found for found in map(_known_warning_class, names) if found is not None), UserWarning
    )
    category, instance = _warning_instance(category, message)
    warning = warnings.WarningMessage(
        instance,
        category,
        str(payload.get("filename", "?")),
        _int(payload.get("lineno"), 0),
    )
    item.config.hook.pytest_warning_recorded.call_historic(
        kwargs={
            "warning_message": warning,
            "when": "runtest",
            "nodeid": item.nodeid,
            "location": None,
        }
    )
    return None


@functools.lru_cache(maxsize=64)
def _summary_of(spec: IsolationSpec) -> str:
    return spec.summary()


def _annotate(reports: list[pytest.TestReport], spec: IsolationSpec, stats: Any) -> None:
    """What the report says about its isolation: -v, failures and junitxml."""
    peak = getattr(stats, "peak_memory", None) if stats is not None else None
    summary = _summary_of(spec)
    for report in reports:
        report.isolate_summary = summary  # type: ignore[attr-defined]
        if report.failed and not any(name == "isolation" for name, _ in report.sections):
            report.sections.append(("isolation", f"ran isolated: {summary}"))
    last = reports[-1]
    if peak is not None:
        last.isolate_peak_memory = int(peak)  # type: ignore[attr-defined]
        last.user_properties.append(("isolate_peak_memory", int(peak)))
    if stats is not None:
        # Where the user looks first: the call's report (its failure, or -rP).
        last = next((r for r in reports if r.when == "call"), last)
        if getattr(stats, "pids_max_hits", 0):
            last.sections.append(
                (
                    "isolation",
                    f"the pids limit of {spec.pids} was hit "
                    f"{stats.pids_max_hits} time(s): fork() failed with EAGAIN",
                )
            )
        if getattr(stats, "nr_throttled", None):
            last.sections.append(
                (
                    "isolation",
                    f"CPU quota {spec.cpu} cores: throttled "
                    f"{stats.nr_throttled} time(s), "
                    f"{(stats.throttled_usec or 0) / 1e6:.2f} s in all",
                )
            )
