"""Builds the native ops (csrc/**) into the extension module ``tp_numa._C``.

Every .cpp under csrc/ is compiled with the project-wide flags. SIMD variants are
selected inside the sources with ``#pragma GCC target(...)`` per file, so one build
carries the scalar, AVX2 and AVX-512 paths and the choice is made at run time.

``pip install --no-build-isolation -e .`` builds the extension as part of the install, in
a throw-away folder (every source, every time). scripts/setup.sh instead registers the
package with ``TP_NUMA_SKIP_NATIVE_BUILD=1`` (no compiling) and builds the extension with
scripts/build_ext.sh, incrementally in build/ and only when its inputs changed.
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

if os.environ.get("TP_NUMA_SKIP_NATIVE_BUILD") == "1":
    setup()
else:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    setup(
        ext_modules=[
            CppExtension(
                name="tp_numa._C",
                sources=sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"],
                extra_link_args=["-fopenmp", "-lrt"],
            )
        ],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
