"""selfheal_ext: notice data drift in a deployed PyTorch model and repair it
online with small adapters, without labels.

This release holds the compiled core (the fused ops in ``selfheal_ext.ops`` and
their pure-PyTorch definitions in ``selfheal_ext.reference``) and the drift
monitor ``DriftMonitor``.
"""

from . import ops, reference
from ._extension import build_info
from .monitor import Attribution, CalibrationReport, DriftMonitor, DriftReport

__all__ = ["ops", "reference", "build_info", "DriftMonitor", "DriftReport", "CalibrationReport", "Attribution"]
__version__ = "0.1.0"
