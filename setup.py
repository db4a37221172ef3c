"""Build of granet's optional native kernels; everything else about the package is in pyproject.toml.

``src/granet/kernels/_native.c`` is compiled by the normal build (``pip install .``, ``pip install -e .``,
``python -m build``) into the extension module ``granet.kernels._native_kernels``, which
:mod:`granet.kernels.native` loads with ctypes; ``src/granet/deploy/_condensed.c`` likewise into
``granet.deploy._condensed_kernels``, which :mod:`granet.deploy.condensed` loads. The kernels are optional,
as PyYAML's LibYAML binding is: without a working C compiler (or Python's headers) the build warns, the
install still succeeds, and granet runs the torch operations that give the same results. No compiler runs
after install.

Flags: optimised, portable code (no ``-march``: the AVX2 and AVX-512 variants are chosen when
the library is loaded, see ``_native.c``) and no floating-point contraction.
"""
from __future__ import annotations

import hashlib
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

SOURCE = os.path.join("src", "granet", "kernels", "_native.c")
CONDENSED_SOURCE = os.path.join("src", "granet", "deploy", "_condensed.c")


def source_hash(path: str) -> int:
    """The first 60 bits of the file's SHA-256 (as ``granet.kernels.native`` computes them)."""
    with open(path, "rb") as f:
        return int(hashlib.sha256(f.read()).hexdigest()[:15], 16)


class OptionalBuildExt(build_ext):
    """``build_ext`` that warns instead of failing when the kernels cannot be compiled."""

    def run(self) -> None:
        self._failed: list[Extension] = []
        super().run()
        if self.inplace:  # also set by an editable install
            for ext in self._failed:
                self._remove_in_place_copy(ext)

    def build_extension(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "msvc":
            # /fp:precise (the default) does not contract a*b+c into an FMA without /arch:AVX2.
            flag_sets = [["/O2", "/fp:precise"]]
        else:
            # -falign-loops=32: the radix select's counting loops are scalar and ran 15-20% slower
            # in some of the four instruction-set variants when their loop heads fell badly. The
            # second set is for a compiler that rejects one of these: no kernel has an a*b+c to
            # contract, so the results are the same without -ffp-contract=off.
            flag_sets = [["-O3", "-ffp-contract=off", "-falign-loops=32"], ["-O3"]]
        for i, flags in enumerate(flag_sets):
            ext.extra_compile_args = flags
            try:
                super().build_extension(ext)
                return
            except (CCompilerError, ExecError, PlatformError, OSError) as e:
                if i + 1 < len(flag_sets):
                    print(f"granet's native kernels: {' '.join(flags)}: {e}; trying {' '.join(flag_sets[i + 1])}",
                          file=sys.stderr)
                    continue
                print(f"WARNING: granet's native kernels were not built ({e}); granet will use torch operations, "
                      "which give the same results more slowly. Install a C compiler and reinstall granet to build "
                      "them.", file=sys.stderr)
                self._failed.append(ext)
                # A library left in the build directory by an earlier build would be packaged instead.
                self._remove(self.get_ext_fullpath(ext.name))

    def _remove_in_place_copy(self, ext: Extension) -> None:
        """An in-place build (an editable install) keeps the library in the source tree: remove one
        left by an earlier build, so that granet does not load kernels older than the source."""
        fullname = self.get_ext_fullname(ext.name)
        package_dir = self.get_finalized_command("build_py").get_package_dir(fullname.rpartition(".")[0])
        self._remove(os.path.join(package_dir, os.path.basename(self.get_ext_filename(fullname))))

    @staticmethod
    def _remove(path: str) -> None:
        if os.path.exists(path):
            os.remove(path)


setup(
    ext_modules=[
        Extension(
            "granet.kernels._native_kernels",
            sources=[SOURCE],
            define_macros=[("GRANET_SOURCE_HASH", f"0x{source_hash(SOURCE):015x}ULL")],
            optional=True,  # an in-place (editable) build then skips copying a library it did not build
        )
    ] + ([
        Extension(
            "granet.deploy._condensed_kernels",
            sources=[CONDENSED_SOURCE],
            define_macros=[("GRANET_SOURCE_HASH", f"0x{source_hash(CONDENSED_SOURCE):015x}ULL")],
            optional=True,
        )
    ] if os.path.exists(CONDENSED_SOURCE) else []),  # a partial copy of the tree (a test's) builds the rest
    cmdclass={"build_ext": OptionalBuildExt},
)
