"""batchrun's version, in a module of its own so that inner modules can read it
without importing the package root (whose lazy ``__getattr__`` loads the API)."""

__version__ = "0.1.0"
