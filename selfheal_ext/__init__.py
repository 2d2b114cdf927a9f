"""selfheal_ext: notice data drift in a deployed PyTorch model and repair it
online with small adapters, without labels.

This release holds the compiled core (the fused ops in ``selfheal_ext.ops`` and
their pure-PyTorch definitions in ``selfheal_ext.reference``), the drift
monitor ``DriftMonitor``, dormant adapters (``selfheal_ext.adapters``) and
``FeatureMonitor`` (the same tests on feature tables, no model), ``SelfHealer``, which serves a model and heals it online, with governance
(``selfheal_ext.governance``: audit log, snapshots, policy, bias guard) and
symbolic rules (``selfheal_ext.rules``).
"""

__version__ = "0.1.0"

from . import governance, ops, reference, rules
from ._extension import build_info
from .accuracy_estimate import AccuracyEstimator
from .adapters import AdapterSet, attach_adapters
from .feature_monitor import FeatureAttribution, FeatureMonitor
from .governance import AuditLog, BiasGuard, Policy, SnapshotStore
from .heal.config import HealerConfig
from .healer import HealEvent, SelfHealer
from .monitor import Attribution, CalibrationReport, DriftMonitor, DriftReport

__all__ = ["ops", "reference", "build_info", "DriftMonitor", "DriftReport", "CalibrationReport", "Attribution",
           "FeatureMonitor", "FeatureAttribution", "AccuracyEstimator",
           "SelfHealer", "HealerConfig", "HealEvent", "AdapterSet", "attach_adapters", "governance", "rules",
           "AuditLog",
           "SnapshotStore", "Policy", "BiasGuard"]
