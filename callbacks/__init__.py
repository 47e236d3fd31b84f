"""Lightning callbacks of lightning-alphaedit (installed as ``lightning_alphaedit.callbacks``).

One concern per callback: `NullSpaceUpdate` edits the weights after every batch and owns the
edit state; the others measure and write around it and read it through its public
attributes (`find_callback`). The CLI and ``edit()`` add the standard set
(`STANDARD_MONITORS`), each configured under its own key, and `EditProgressBar` when the
trainer shows progress.
"""

from lightning_alphaedit.callbacks.find import find_callback, require_callback
from lightning_alphaedit.callbacks.null_space_update import NullSpaceUpdate
from lightning_alphaedit.callbacks.drift_monitor import DriftMonitor
from lightning_alphaedit.callbacks.edit_history import EditHistory
from lightning_alphaedit.callbacks.edit_checkpoint import EditCheckpoint
from lightning_alphaedit.callbacks.export_edited_model import ExportEditedModel
from lightning_alphaedit.callbacks.capability import CapabilityConfig, CapabilityMonitor
from lightning_alphaedit.callbacks.edit_progress import EditProgressBar

STANDARD_MONITORS = {
    "drift": DriftMonitor,
    "history": EditHistory,
    "checkpoint": EditCheckpoint,
    "export": ExportEditedModel,
}
"""The callbacks a run has beside ``edit`` (`NullSpaceUpdate`), by their config key, in the order
they run: after the update (they read what it did)."""

__all__ = [
    "CapabilityConfig", "CapabilityMonitor", "DriftMonitor", "EditCheckpoint", "EditHistory", "EditProgressBar",
    "ExportEditedModel", "NullSpaceUpdate", "STANDARD_MONITORS", "find_callback", "require_callback",
]
