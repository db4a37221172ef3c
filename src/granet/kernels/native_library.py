"""Loading granet's optional C libraries: one loader for every library ``setup.py`` builds.

granet ships its C kernels as plain C files (no torch headers) that ``setup.py`` compiles into
extension modules when the package is built: the selection kernels of :mod:`granet.kernels.native`
and the condensed fan-in products of :mod:`granet.deploy.condensed`. A :class:`NativeLibrary` finds
such a module with importlib and loads it with ``ctypes`` on first use (no compiler runs at import
or run time), and refuses it, saying why in :meth:`~NativeLibrary.status`, when it cannot be used:

* ``"not built (...)"``: the package was installed without a working C compiler;
* ``"stale (...)"``: the C source beside it (a source checkout) changed since it was built; every
  library exports ``PREFIX_source_hash()``, the first 60 bits of its source's SHA-256;
* ``"unusable (...)"``: not loadable here, missing a symbol, built without the instruction set asked
  for, or failing its self-test (a callback: ``""`` when the library passed, else the reason).

Every library exports ``PREFIX_levels()`` (a bit per instruction set this CPU runs) and
``PREFIX_use(level)`` (the set to run; ``-1`` the widest, ``-1`` returned when refused): a loaded
library runs the widest set and its status is ``"in use (LEVEL)"``.

One switch turns all of them off: ``GRANET_NATIVE=0`` (or ``false``, ``no``, ``off``) in the
environment, read once at import, gives ``"off (GRANET_NATIVE=0)"``, and the callers run torch
operations instead, with the same bits. :meth:`~NativeLibrary.set_enabled` turns one library off or
on in this process.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import threading
from typing import Callable, Optional, Sequence

__all__ = ["NOT_BUILT", "NativeLibrary", "source_hash"]

logger = logging.getLogger(__name__)

NOT_BUILT = "not built (no working C compiler when granet was installed)"
_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _from_environment() -> bool:
    value = os.environ.get("GRANET_NATIVE", "1")
    if value.strip().lower() not in _SWITCH:
        logger.warning("GRANET_NATIVE=%r is not one of 1/0, true/false, yes/no, on/off: the native kernels stay on",
                       value)
        return True
    return _SWITCH[value.strip().lower()]


# Read once, for every library: a forward pass of a small layer cannot afford an environment lookup
# per call, and an unknown value is warned about once.
_ENABLED = _from_environment()


def source_hash(path: str) -> int:
    """The first 60 bits of the file's SHA-256, as ``setup.py`` compiles them into the library."""
    with open(path, "rb") as f:
        return int(hashlib.sha256(f.read()).hexdigest()[:15], 16)


class NativeLibrary:
    """One optional C library: where it is, how to declare and check it, and whether it runs.

    Args:
        module: the extension module ``setup.py`` builds, e.g. ``"granet.kernels._native_kernels"``.
        source: the C file it is built from (checked for staleness where it exists).
        prefix: the prefix of the library's exported names (``PREFIX_source_hash``, ``PREFIX_levels``,
            ``PREFIX_use``), e.g. ``"granet_kernels"``.
        levels: the names of the instruction sets, by the numbers ``PREFIX_use`` returns.
        declare: sets the ctypes signatures of the library's other functions (raises AttributeError
            for a missing one).
        self_test: ``""`` when the loaded library gives the expected results, else the reason,
            which follows the path in the status (``"unusable (PATH REASON)"``); ``None``: no test.
        log: where a loaded library is announced (at debug level, ``"NAME in use (LEVEL)"``), if anywhere.
        name: the library's name in that line, e.g. ``"native selection kernels"``.
    """

    def __init__(self, module: str, source: str, prefix: str, levels: Sequence[str],
                 declare: Callable[[ctypes.CDLL], None], self_test: Optional[Callable[[ctypes.CDLL], str]] = None,
                 log: Optional[logging.Logger] = None, name: str = "") -> None:
        self.module = module
        self.source = source
        self.prefix = prefix
        self.levels = tuple(levels)
        self.declare = declare
        self.self_test = self_test
        self.log = log
        self.name = name
        self.lock = threading.Lock()
        self.enabled = _ENABLED
        self.off = "" if self.enabled else "off (GRANET_NATIVE=0)"  # status() while turned off
        self.lib: Optional[ctypes.CDLL] = None
        self.loaded = False
        self.state = ""  # status() once loaded: "in use (LEVEL)", or why there is no library

    def set_enabled(self, flag: bool) -> bool:
        """Use the library (where it is built) or not; returns the previous setting."""
        previous, self.enabled = self.enabled, bool(flag)
        if previous != self.enabled:
            self.off = "" if self.enabled else "off (set_enabled(False))"
        return previous

    def library(self) -> Optional[ctypes.CDLL]:
        """The loaded library, or ``None`` (turned off, or not usable: see :meth:`status`)."""
        if not self.enabled:
            return None
        if not self.loaded:
            with self.lock:
                if not self.loaded:
                    self.lib, self.state = self.load()
                    self.loaded = True
                    if self.lib is not None and self.log is not None:
                        self.log.debug("%s %s", self.name, self.state)
        return self.lib

    def available(self) -> bool:
        """Whether the library is in use: built, loaded, checked and not turned off."""
        return self.library() is not None

    def status(self) -> str:
        """``"in use (LEVEL)"``, ``"off (GRANET_NATIVE=0)"``, ``"off (set_enabled(False))"``,
        ``"not built (...)"``, ``"stale (...)"`` or ``"unusable (...)"``."""
        if not self.enabled:
            return self.off
        self.library()
        return self.state

    def load(self) -> tuple[Optional[ctypes.CDLL], str]:
        """The installed library and ``"in use (LEVEL)"``, or ``None`` and why not."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            return None, NOT_BUILT
        # The source sits beside the library in a source checkout (editable install), where it may
        # have changed since the library was built; a wheel may not ship it.
        return self.open(spec.origin, self.source if os.path.exists(self.source) else None)

    def open(self, path: str, source: Optional[str], level: int = -1) -> tuple[Optional[ctypes.CDLL], str]:
        """The library at ``path`` loaded, checked (built from ``source`` where given; the self-test)
        and set to ``level`` (-1: the widest this CPU runs); or ``None`` and why not."""
        try:
            lib = ctypes.CDLL(path)
            self._declare(lib)
        except (OSError, AttributeError) as e:  # not loadable here, or built from a version without a symbol
            return None, f"unusable ({path}: {e})"
        if source is not None and getattr(lib, f"{self.prefix}_source_hash")() != source_hash(source):
            return None, f"stale ({path} was built from an older {os.path.basename(source)}: reinstall granet)"
        used = getattr(lib, f"{self.prefix}_use")(level)
        if used < 0:
            return None, f"unusable ({path}: level {level} does not run on this CPU)"
        failed = "" if self.self_test is None else self.self_test(lib)
        if failed:
            return None, f"unusable ({path} {failed})"
        return lib, f"in use ({self.levels[used]})"

    def _declare(self, lib: ctypes.CDLL) -> None:
        """The signatures every library shares, then the library's own."""
        for suffix, restype, argtypes in (("source_hash", ctypes.c_uint64, []), ("levels", ctypes.c_int, []),
                                          ("use", ctypes.c_int, [ctypes.c_int])):
            function = getattr(lib, f"{self.prefix}_{suffix}")
            function.restype, function.argtypes = restype, argtypes
        self.declare(lib)
