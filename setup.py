"""Builds the compiled parts where Cython and a C compiler are found; everything else is in
pyproject.toml. Without a compiler the build goes on (the extensions are optional) and the
gateway runs the Python they are compiled from.

- pooler/masking/_rows.pyx: the masked-row rewrite and the recorder's row reading, a Cython
  twin of Python code that stays the definition (differential tests hold them equal);
- pooler/sql/analyzer.py and lineage.py: the same Python modules compiled by Cython as they
  are (no second source). Each binary gets a ``<binary>.source-sha256`` beside it, the digest
  of the .py it was made from: pooler/sql/__init__.py imports the .py instead of a binary whose
  source has changed since (an edit or a checkout without a rebuild).
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE_COMPILED = ["pooler/sql/analyzer.py", "pooler/sql/lineage.py"]


class BuildExt(build_ext):
    def build_extension(self, ext):
        super().build_extension(ext)
        _record_source(ext, Path(self.get_ext_fullpath(ext.name)))

    def copy_extensions_to_source(self):  # (an in-place build: ./dev.sh setup, pip install -e)
        super().copy_extensions_to_source()
        for ext in self.extensions:
            _record_source(ext, Path(self.get_ext_filename(ext.name)))


def _record_source(ext, binary: Path) -> None:
    if ext.name.startswith("pooler.sql.") and binary.exists():  # (an optional one that failed has none)
        digest = hashlib.sha256(Path(ext.sources[0]).with_suffix(".py").read_bytes()).hexdigest()
        binary.with_name(binary.name + ".source-sha256").write_text(digest + "\n")


try:
    from Cython.Build import cythonize
except ImportError:  # a build without Cython: the Python path only
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("pooler.masking._rows", ["pooler/masking/_rows.pyx"], optional=True,
                   extra_compile_args=["-O2"])],
        language_level=3, quiet=True)
    # Python's meaning exactly: annotations stay annotations (annotation_typing would make a
    # ``tuple[str, ...]`` parameter refuse a list, which the .py accepts)
    ext_modules += cythonize(
        [Extension(p[:-3].replace("/", "."), [p], optional=True, extra_compile_args=["-O2"])
         for p in SOURCE_COMPILED],
        language_level=3, quiet=True, compiler_directives={"annotation_typing": False})

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
