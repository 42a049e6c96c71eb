"""Build cbn's Cython kernels (pyx/*.pyx -> cbn._*) with OpenMP when the compiler has it.

Metadata lives in pyproject.toml; this file only describes the extensions.
Cython and the OpenMP probe run inside ``build_ext``, so reading metadata or
making an sdist compiles nothing.  The probe compiles *and runs* a small
program.  Without OpenMP, or with CBN_NO_OPENMP=1, the same sources build
serially (cbn_omp.h supplies stand-ins) and still vectorise through
-fopenmp-simd.  Extensions are built without debug information (-g0).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PYX = "pyx"
MODULES = ["_stats", "_normalize", "_backward", "_threads"]

PROBE = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d\n", n);
    return n > 0 ? 0 : 1;
}
"""


def compiler_command():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()


def openmp_works():
    """Compile and run an OpenMP program; True when both succeed."""
    if sys.platform == "win32":
        return False
    if os.environ.get("CBN_NO_OPENMP", "") not in ("", "0"):
        warnings.warn("CBN_NO_OPENMP is set: building cbn without OpenMP (serial kernels).")
        return False
    tmp = Path(tempfile.mkdtemp(prefix="cbn-omp-"))
    try:
        (tmp / "probe.c").write_text(PROBE)
        exe = tmp / "probe"
        build = compiler_command() + ["-fopenmp", str(tmp / "probe.c"), "-o", str(exe)]
        if subprocess.run(build, capture_output=True).returncode != 0:
            raise OSError("the compiler rejects -fopenmp")
        if subprocess.run([str(exe)], capture_output=True, timeout=30).returncode != 0:
            raise OSError("the OpenMP probe does not run")
        return True
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"OpenMP unavailable ({exc}): building cbn with serial kernels.")
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildKernels(build_ext):
    """build_ext that cythonizes, probes OpenMP and sets the flags when it runs (not when
    an sdist or the metadata only asks for its source list)."""

    def run(self):
        import numpy
        from Cython.Build import cythonize

        use_openmp = openmp_works()
        compile_args = ["-O3", "-g0", "-fno-math-errno", "-fno-trapping-math",
                        "-fopenmp" if use_openmp else "-fopenmp-simd"]
        link_args = ["-fopenmp"] if use_openmp else []
        if sys.platform.startswith("linux"):
            link_args.append("-Wl,--strip-debug")
        for ext in self.extensions:
            ext.include_dirs += [PYX, numpy.get_include()]
            ext.extra_compile_args += compile_args
            ext.extra_link_args += link_args
        translated = cythonize(self.extensions, include_path=[PYX], quiet=True,
                               compiler_directives={"language_level": "3"})
        for ext, c_ext in zip(self.extensions, translated):  # keep setuptools' own objects
            ext.sources = c_ext.sources
        super().run()


setup(
    ext_modules=[
        Extension(f"cbn.{name}", [f"{PYX}/{name}.pyx"],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
        for name in MODULES
    ],
    cmdclass={"build_ext": BuildKernels},
)
