"""Lightning callbacks of lightning-alphaedit (installed as ``lightning_alphaedit.callbacks``)."""

from lightning_alphaedit.callbacks.null_space_update import NullSpaceUpdate
from lightning_alphaedit.callbacks.capability import CapabilityConfig, CapabilityMonitor

__all__ = ["CapabilityConfig", "CapabilityMonitor", "NullSpaceUpdate"]
