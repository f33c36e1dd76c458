"""The version of hessfast, in a leaf module (it imports nothing), so any module can read it
without importing the package's ``__init__`` (``from .._version import __version__``)."""

__version__ = "0.1.0"
