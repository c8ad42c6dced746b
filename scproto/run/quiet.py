"""Known third-party console noise, silenced where it starts (called by every entry point
and by ``ScProto.train``): messages that tell a user nothing about their run."""

import logging
import warnings

TIPS = ("💡 Tip:",)  # Lightning's advertisement for its cloud logger, on every Trainer


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(TIPS)


def quiet_third_party() -> None:
    """Idempotent: filters are added once."""
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rank_zero.filters):
        rank_zero.addFilter(_DropTips())
    # Lightning 2.6 calls a torch.utils._pytree API that torch 2.13 deprecates.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
