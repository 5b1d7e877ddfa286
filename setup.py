"""The one compiled piece: XLA:CPU's float32 products through oneMKL (omnijax/models/matmul.py).

Optional: without a C++ compiler the build is skipped and the products stay XLA's own.
"""

import pathlib

import jaxlib
from setuptools import Extension, setup

setup(
  ext_modules=[
    Extension(
      "omnijax.models._cpu_gemm",
      ["omnijax/models/cpu_gemm.cc"],
      include_dirs=[str(pathlib.Path(jaxlib.__file__).parent / "include")],
      extra_compile_args=["-std=c++17", "-O2", "-w"],
      optional=True,
    )
  ]
)
