"""Python's at-fork handlers, for the forks of a zygote.

``os.fork()`` (and ``syscalls.fork_sibling``) runs the Python callables
registered with ``os.register_at_fork``: the standard library's reset the
``threading`` module, reinitialise ``logging``'s locks (taken before the
fork, released after) and reseed ``random``. In a test process each costs
page faults: it is Python code writing to objects shared with the zygote
(reference counts, new locks). Without them, a test process has about 70
fewer before its setup (310 -> 238), about 50 fewer in all (some of those
pages it writes later anyway).

In a zygote they have nothing to do: it is single-threaded and holds no
lock of theirs while it forks (it waits for requests), and its own
``threading`` state was reset when it was forked. So when every handler
registered before the fork, or after it in the parent, is one of those
known here, the zygote forks without any, and the child does what is
left: it reseeds ``random``, runs every other after-fork handler in order
(a library's own), records its native thread id, and puts the lists back,
so a fork the test makes runs them all as usual. Any other handler before
the fork or after it in the parent, whose pairing with the child's is
unknown, keeps the usual path.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ForkHandlers", "find_handlers"]

_Handler = Callable[[], object]
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
#: logging's handlers around a fork (3.13 renamed the parent's two).
_LOGGING_HANDLERS = (
    "_acquireLock",
    "_releaseLock",
    "_prepareFork",
    "_afterFork",
    "_after_at_fork_child_reinit_locks",
)


@dataclass(frozen=True)
class ForkHandlers:
    """The interpreter's own lists of at-fork handlers (found once, in
    pytest's process)."""

    before: list[_Handler]
    parent: list[_Handler]
    child: list[_Handler]

    def quiet(self) -> Callable[[], None] | None:
        """In the zygote, once: empty the lists when every handler in them is
        known, and return what each child calls right after the fork (None:
        the zygote keeps the usual path)."""
        if not all(map(_skippable, self.before + self.parent)):
            return None
        saved = (tuple(self.before), tuple(self.parent), tuple(self.child))
        run = tuple(handler for handler in self.child if not _skippable(handler))
        self.before.clear()
        self.parent.clear()
        self.child.clear()
        lists = (self.before, self.parent, self.child)
        # The zygote's one thread is each child's: looked up once.
        set_native_id = getattr(threading.current_thread(), "_set_native_id", None)

        def after_fork_child() -> None:
            for kept, handlers in zip(lists, saved, strict=True):
                kept.extend(handlers)
            for handler in run:
                try:
                    handler()
                except BaseException as exc:  # all of them, as the interpreter
                    _report_unraisable(exc, handler)
            if set_native_id is not None:
                set_native_id()

        return after_fork_child


def _report_unraisable(exc: BaseException, handler: _Handler) -> None:
    """What the interpreter does with an exception of an at-fork handler:
    sys.unraisablehook, with its own argument type (the default hook takes
    no other), caught once from an object whose __del__ raises."""
    caught: list[object] = []

    class _Raises:
        def __del__(self) -> None:
            raise RuntimeError

    hook, sys.unraisablehook = sys.unraisablehook, caught.append
    try:
        _Raises()
    finally:
        sys.unraisablehook = hook
    args = type(caught[0])((type(exc), exc, exc.__traceback__, None, handler))  # type: ignore[call-arg]
    sys.unraisablehook(args)  # type: ignore[arg-type]


def find_handlers() -> ForkHandlers | None:
    """The interpreter's three lists, found as the lists that hold the
    handlers ``threading`` and ``logging`` register (None where they are not
    found exactly once). Before any ``gc.freeze()``: frozen objects are not
    searched."""
    before_fork = getattr(logging, "_prepareFork", None) or getattr(logging, "_acquireLock", None)
    after_parent = getattr(logging, "_afterFork", None) or getattr(logging, "_releaseLock", None)
    after_child = getattr(threading, "_after_fork", None)
    handlers = (before_fork, after_parent, after_child)
    if None in handlers:
        return None
    found: list[list[_Handler]] = []
    lists = [ref for ref in gc.get_referrers(*handlers) if type(ref) is list]
    for handler in handlers:
        holding = [lst for lst in lists if any(item is handler for item in lst)]
        if len(holding) != 1:
            return None
        found.append(holding[0])
    if len({id(lst) for lst in found}) != 3:
        return None
    return ForkHandlers(*found)


def _skippable(handler: _Handler) -> bool:
    """A handler with nothing to do in a single-threaded process that holds
    none of its locks: threading's reset, logging's lock handling, a lock
    taken before the fork and released after it in the parent
    (concurrent.futures; its reinitialisation in the child is run)."""
    if handler is getattr(threading, "_after_fork", None):
        return True
    if any(handler is getattr(logging, name, None) for name in _LOGGING_HANDLERS):
        return True
    owner = getattr(handler, "__self__", None)
    name = getattr(handler, "__name__", "")
    return isinstance(owner, _LOCK_TYPES) and name in ("acquire", "release")
