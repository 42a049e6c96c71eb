"""Build cbn's Cython kernels (pyx/*.pyx -> cbn._*) with OpenMP when the compiler has it.

The OpenMP probe compiles *and runs* a small program.  Without OpenMP, or with
CBN_NO_OPENMP=1, the same sources build serially (cbn_omp.h supplies stand-ins)
and still vectorise through -fopenmp-simd.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent.resolve()
PYX = HERE / "pyx"
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


def extensions():
    use_openmp = sys.platform != "win32" and openmp_works()
    compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    link_args = []
    if use_openmp:
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    else:
        compile_args.append("-fopenmp-simd")
    return [
        Extension(
            f"cbn.{name}",
            [f"pyx/{name}.pyx"],
            include_dirs=[str(PYX), numpy.get_include()],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for name in MODULES
    ]


setup(
    ext_modules=cythonize(
        extensions(),
        include_path=[str(PYX)],
        compiler_directives={"language_level": "3"},
    ),
)
