"""Builds the compiled parts where Cython and a C compiler are found; everything else is in
pyproject.toml. Without a compiler the build goes on (the extensions are optional) and the
gateway runs the Python they are compiled from.

- pooler/masking/_rows.pyx: the masked-row rewrite and the recorder's row reading, a Cython
  twin of Python code that stays the definition (differential tests hold them equal);
- pooler/recording/_seal.pyx: the recording writer's hash chain (``seal_run`` in
  recording/writer.py is the definition), linked to OpenSSL's libcrypto;
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
SOURCE_MODULES = {p[:-3].replace("/", ".") for p in SOURCE_COMPILED}


class BuildExt(build_ext):
    """Writes a digest only beside a binary this build made: the digest goes first, and is
    written again once the compiler has made the binary (an optional extension that fails to
    build raises before that; Cython regenerates these modules' C every build, so none is
    skipped as up to date by timestamps). An in-place build copies the digest with the binary,
    and removes the one beside an in-place binary this build did not make."""

    def build_extension(self, ext):
        binary = Path(self.get_ext_fullpath(ext.name))
        if ext.name in SOURCE_MODULES:
            _sidecar(binary).unlink(missing_ok=True)
            digest = _digest(ext)
        super().build_extension(ext)
        if ext.name in SOURCE_MODULES and binary.exists():
            _sidecar(binary).write_text(digest + "\n")

    def copy_extensions_to_source(self):  # (an in-place build: ./dev.sh setup, pip install -e)
        super().copy_extensions_to_source()
        for ext in self.extensions:
            if ext.name in SOURCE_MODULES:
                built = _sidecar(Path(self.build_lib) / self.get_ext_filename(ext.name))
                here = _sidecar(Path(self.get_ext_filename(ext.name)))  # (the package dirs are the paths)
                if built.exists():
                    here.write_bytes(built.read_bytes())
                else:
                    here.unlink(missing_ok=True)


def _sidecar(binary: Path) -> Path:
    return binary.with_name(binary.name + ".source-sha256")


def _digest(ext) -> str:
    return hashlib.sha256(Path(ext.sources[0]).with_suffix(".py").read_bytes()).hexdigest()


try:
    from Cython.Build import cythonize
except ImportError:  # a build without Cython: the Python path only
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("pooler.masking._rows", ["pooler/masking/_rows.pyx"], optional=True,
                   extra_compile_args=["-O2"]),
         # the writer's sealing (hash chain) in C: OpenSSL's libcrypto (Debian's libssl-dev)
         Extension("pooler.recording._seal", ["pooler/recording/_seal.pyx"], optional=True,
                   extra_compile_args=["-O2"], libraries=["crypto"],
                   define_macros=[("OPENSSL_SUPPRESS_DEPRECATED", None)])],
        language_level=3, quiet=True)
    # Python's meaning exactly: annotations stay annotations (annotation_typing would make a
    # ``tuple[str, ...]`` parameter refuse a list, which the .py accepts)
    ext_modules += cythonize(
        [Extension(p[:-3].replace("/", "."), [p], optional=True, extra_compile_args=["-O2"])
         for p in SOURCE_COMPILED],
        language_level=3, quiet=True, compiler_directives={"annotation_typing": False}, force=True)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
