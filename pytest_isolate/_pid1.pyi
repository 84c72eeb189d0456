def available() -> bool: ...
def spawn(
    flags: int,
    sibling: bool,
    result_fd: int,
    killed_fd: int,
    cgroup_fd: int,
    tid_addr: int,
    kill_all: int,
    dump: int,
    fault: int,
    /,
) -> int: ...
