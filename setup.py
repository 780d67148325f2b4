"""Builds the compiled twin of the masked-row rewrite (pooler/masking/_rows.pyx) where Cython
and a C compiler are found; everything else is in pyproject.toml. Without a compiler the build
goes on (the extension is optional) and the gateway uses the Python path it was compiled from."""

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # a build without Cython: the Python path only
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("pooler.masking._rows", ["pooler/masking/_rows.pyx"], optional=True,
                   extra_compile_args=["-O2"])],
        language_level=3, quiet=True)

setup(ext_modules=ext_modules)
