"""Label-free estimates of a classifier's accuracy on a window of drifted data.

Notation: ``c_i`` is the calibrated confidence of sample ``i`` (the largest
softmax probability of its logits divided by the monitor's temperature ``T``,
fitted on the labelled reference when labels are given); ``R`` is the
reference (calibration) set, ``a_R`` its accuracy measured with its labels;
``W`` is the window being judged.

* average confidence (AC), the estimate the monitor always had::

      acc_AC(W)  = mean_{i in W} c_i

* ATC, average thresholded confidence (Garg et al., ICLR 2022, eq. 1): a
  threshold ``t`` is chosen on the labelled reference so that the share of
  reference samples above it equals the reference accuracy, then::

      mean_{i in R} 1[c_i > t] = a_R
      acc_ATC(W) = mean_{i in W} 1[c_i > t]

* DoC, difference of confidences (Guillory et al., ICCV 2021): the drop in
  accuracy is estimated by the drop in mean confidence::

      acc_DoC(W) = a_R - (mean_{i in R} c_i - mean_{i in W} c_i)

The estimated drop of an estimate is ``a_R - acc(W)``. ATC and DoC need
``a_R``, so they need labels at calibration; without labels only AC is
available and its drop is taken from the reference's own mean confidence,
``mean_R c - acc_AC(W)`` (stated in every estimate as ``labelled=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

ESTIMATORS = ("confidence", "atc", "doc")


@dataclass
class AccuracyEstimator:
    """The reference numbers the estimates need (see the module docstring).

    ``reference_confidence`` is ``mean_R c``; ``reference_accuracy`` (``a_R``)
    and ``atc_threshold`` (``t``) are None when calibrated without labels.
    """

    reference_confidence: float
    reference_accuracy: Optional[float] = None
    atc_threshold: Optional[float] = None

    @classmethod
    def fit(cls, confidence: torch.Tensor, correct: Optional[torch.Tensor] = None) -> "AccuracyEstimator":
        """From the reference's calibrated confidences and, when labels were
        given, whether each reference prediction was right."""
        confidence = confidence.double().reshape(-1)
        if confidence.numel() == 0:
            raise ValueError("selfheal: AccuracyEstimator.fit needs at least one reference sample")
        reference_confidence = float(confidence.mean())
        if correct is None:
            return cls(reference_confidence)
        correct = correct.reshape(-1)
        if correct.numel() != confidence.numel():
            raise ValueError(f"selfheal: AccuracyEstimator.fit got {correct.numel()} correctness flags for "
                             f"{confidence.numel()} confidences")
        accuracy = float(correct.double().mean())
        return cls(reference_confidence, accuracy, _atc_threshold(confidence, accuracy))

    @property
    def labelled(self) -> bool:
        return self.reference_accuracy is not None

    def batch_sums(self, confidence: torch.Tensor) -> torch.Tensor:
        """Per-batch count of samples above the ATC threshold (float64, on the
        confidence's device; 0 without labels): the window sums it."""
        if self.atc_threshold is None:
            return torch.zeros(1, dtype=torch.float64, device=confidence.device)
        return (confidence > self.atc_threshold).sum().double().reshape(1)

    def estimate(self, confidence_sum: float, above_threshold: float, rows: float) -> Dict[str, object]:
        """Every available estimate for a window of ``rows`` samples whose
        confidences sum to ``confidence_sum``, ``above_threshold`` of them above
        ``t``. Returns ``{"confidence", "atc", "doc", "reference", "labelled"}``
        (``atc``/``doc`` None without labels; ``reference`` is ``a_R``, or
        ``mean_R c`` without labels)."""
        if rows <= 0:
            nan = float("nan")
            return {"confidence": nan, "atc": None if not self.labelled else nan,
                    "doc": None if not self.labelled else nan, "reference": self.reference, "labelled": self.labelled}
        mean_confidence = confidence_sum / rows
        atc = doc = None
        if self.labelled:
            atc = above_threshold / rows
            doc = self.reference_accuracy - (self.reference_confidence - mean_confidence)
        return {"confidence": mean_confidence, "atc": atc, "doc": doc, "reference": self.reference,
                "labelled": self.labelled}

    @property
    def reference(self) -> float:
        """The accuracy drops are measured from: ``a_R``, else ``mean_R c``."""
        return self.reference_accuracy if self.labelled else self.reference_confidence

    def drop(self, estimates: Dict[str, object], estimator: str) -> float:
        """Estimated accuracy drop (reference minus estimate) by ``estimator``;
        ``"auto"`` is ATC with labels, average confidence without."""
        if estimator == "auto":
            estimator = "atc" if self.labelled else "confidence"
        value = estimates.get(estimator)
        if value is None:
            raise ValueError(f"selfheal: the {estimator!r} accuracy estimate needs labels at calibration "
                             "((x, y) pairs); this monitor was calibrated without")
        return self.reference - float(value)

    def state_dict(self) -> Dict[str, Optional[float]]:
        return {"reference_confidence": self.reference_confidence, "reference_accuracy": self.reference_accuracy,
                "atc_threshold": self.atc_threshold}

    @classmethod
    def from_state(cls, state) -> "AccuracyEstimator":
        """Validated: a state with a missing or out-of-range number is refused."""
        if not isinstance(state, dict):
            raise ValueError(f"selfheal: state has a corrupt 'accuracy_estimator' (got {type(state).__name__})")
        try:
            confidence = float(state["reference_confidence"])
            accuracy, threshold = state.get("reference_accuracy"), state.get("atc_threshold")
            accuracy = None if accuracy is None else float(accuracy)
            threshold = None if threshold is None else float(threshold)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"selfheal: state has a corrupt 'accuracy_estimator' ({error})") from None
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"selfheal: state has a corrupt 'accuracy_estimator' (reference_confidence={confidence})")
        if (accuracy is None) != (threshold is None):
            raise ValueError("selfheal: state has a corrupt 'accuracy_estimator' (reference_accuracy and "
                             "atc_threshold must both be set or both be None)")
        if accuracy is not None and not (0.0 <= accuracy <= 1.0 and math.isfinite(threshold)):
            raise ValueError(f"selfheal: state has a corrupt 'accuracy_estimator' (reference_accuracy={accuracy}, "
                             f"atc_threshold={threshold})")
        return cls(confidence, accuracy, threshold)


def _atc_threshold(confidence: torch.Tensor, accuracy: float) -> float:
    """``t`` with ``mean 1[c > t] = accuracy`` on the reference: the
    ``(1 - accuracy)`` quantile of the confidences, taken between two sorted
    values so ties do not move the share."""
    ordered, _ = torch.sort(confidence)
    below = int(round((1.0 - accuracy) * ordered.numel()))  # samples at or under t
    if below <= 0:
        return float(ordered[0]) - 1e-12
    if below >= ordered.numel():
        return float(ordered[-1])
    return 0.5 * (float(ordered[below - 1]) + float(ordered[below]))
