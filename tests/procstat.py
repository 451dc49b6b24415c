"""Test helper: the peak memory of a process, measured so that a child does not inherit its parent's."""

import resource


def peak_rss() -> int:
    """This process's own peak resident set in bytes: ``VmHWM``, which starts afresh at exec. (``ru_maxrss`` of
    a child keeps the high-water mark of the process that forked it, so a pytest process that has grown large
    would make every child look large.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
