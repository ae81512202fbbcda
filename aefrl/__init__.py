"""aefrl: Dreamer-style agents whose RSSM observation model is an AEF or a VAE (README.md)."""

from importlib.metadata import PackageNotFoundError, version

try:  # the installed distribution's version (pyproject.toml), one source of truth
    __version__ = version("aefrl")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"
