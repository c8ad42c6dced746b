"""scProto: interpretable self-supervised prototype learning for single-cell transcriptomics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scproto")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from scproto.api import ScProto  # noqa: E402
from scproto.errors import ScProtoInputError  # noqa: E402

__all__ = ["ScProto", "ScProtoInputError", "__version__"]
