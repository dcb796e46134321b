"""alignscope: predict, watch and prevent alignment collapse during fine-tuning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alignscope")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
