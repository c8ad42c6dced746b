"""scProto: interpretable self-supervised prototype learning for single-cell transcriptomics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scproto")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from scproto import datasets
from scproto.api import ScProto
from scproto.errors import ScProtoInputError

__all__ = ["ScProto", "ScProtoInputError", "__version__", "datasets"]
