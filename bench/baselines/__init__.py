"""What a user would otherwise run, implemented for the benchmarks to compare
against in the same run: drift detectors (``detectors``) and test-time
adaptation methods (``tta``)."""

from .detectors import KSBonferroniDetector, MMDPermutationDetector  # noqa: F401
