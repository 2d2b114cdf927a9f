"""Symbolic rules the adapted model must keep (neuro-symbolic constraints).

A rule measures a *violation* (a number >= 0; 0 means satisfied) of a model's
predictions on a set of inputs. Rules act twice in ``SelfHealer``:

* as differentiable penalties added to the adaptation loss (``penalty``),
  where the rule has a smooth form;
* as a gate (``check``): after each adaptation step the adapted model is
  measured on the recent buffer of served inputs, next to the source model on
  the same inputs. A version that violates a rule more than the source does
  (beyond ``tolerance``) is refused, logged and rolled back. Adaptation must
  not create or worsen a violation; a rule the source model already breaks
  under drift does not freeze healing, but no step may make it worse.

Kinds: ``ClassRate`` (bounds on a predicted-class rate), ``Monotonic`` (a
class probability never moves the wrong way when a named input feature
increases), ``Forbidden`` (classes that must not be predicted for inputs
matching a predicate), ``SourceAgreement`` (agreement with the source model on
a protected slice), and ``UserRule`` (any callable over inputs and
probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

ProbsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RuleContext:
    """What a rule is measured on: ``inputs`` (finite rows), the adapted
    model's probabilities, the source model's, and (for rules that query the
    model at other inputs) functions returning each model's probabilities."""
    inputs: torch.Tensor
    probs: torch.Tensor
    source_probs: Optional[torch.Tensor] = None
    model: Optional[ProbsFn] = None
    source_model: Optional[ProbsFn] = None


@dataclass
class RuleResult:
    rule: str
    ok: bool
    violation: float
    source_violation: Optional[float]
    detail: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {"rule": self.rule, "ok": self.ok, "violation": self.violation,
                "source_violation": self.source_violation, **self.detail}


class Rule:
    """Base class. Subclasses implement ``violation``."""

    needs_model = False     # queries the model at other inputs
    needs_source = False    # compares with the source model's probabilities

    def __init__(self, name: str, *, tolerance: float = 0.0, weight: float = 1.0):
        if not name:
            raise ValueError("selfheal: a rule needs a name")
        if tolerance < 0 or weight < 0:
            raise ValueError(f"selfheal: rule {name!r}: tolerance and weight must be >= 0")
        self.name = name
        self.tolerance = float(tolerance)
        self.weight = float(weight)

    def violation(self, inputs: torch.Tensor, probs: torch.Tensor, *, soft: bool,
                  model: Optional[ProbsFn] = None, source_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scalar violation >= 0. ``soft``: the differentiable form (class
        probabilities instead of argmax decisions)."""
        raise NotImplementedError

    def check(self, context: RuleContext) -> RuleResult:
        with torch.no_grad():
            adapted = float(self.violation(context.inputs, context.probs, soft=False, model=context.model,
                                           source_probs=context.source_probs))
            source = None
            if context.source_probs is not None:
                source = float(self.violation(context.inputs, context.source_probs, soft=False,
                                              model=context.source_model, source_probs=context.source_probs))
        ok = adapted <= self.tolerance or (source is not None and adapted <= source + self.tolerance)
        return RuleResult(self.name, bool(ok), adapted, source, {"rows": int(context.inputs.shape[0])})

    def penalty(self, context: RuleContext) -> Optional[torch.Tensor]:
        if self.weight == 0:
            return None
        value = self.violation(context.inputs, context.probs, soft=True, model=context.model,
                               source_probs=context.source_probs)
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return None
        return self.weight * value

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def _mask(where, inputs: torch.Tensor) -> torch.Tensor:
    if where is None:
        return torch.ones(inputs.shape[0], dtype=torch.bool, device=inputs.device)
    mask = torch.as_tensor(where(inputs), device=inputs.device).reshape(-1).bool()
    if mask.shape[0] != inputs.shape[0]:
        raise ValueError(f"selfheal: a rule predicate returned {mask.shape[0]} flags for {inputs.shape[0]} rows")
    return mask


class ClassRate(Rule):
    """The share of inputs predicted as ``cls`` stays in ``[low, high]``
    (e.g. a fraud rate between 0.1 % and 5 %). Penalty: the mean probability
    of ``cls`` outside the bounds."""

    def __init__(self, cls: int, low: float = 0.0, high: float = 1.0, *, name: Optional[str] = None, **kwargs):
        if not 0 <= low <= high <= 1:
            raise ValueError(f"selfheal: ClassRate bounds must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
        self.cls, self.low, self.high = int(cls), float(low), float(high)
        super().__init__(name or f"rate of class {cls} in [{low:g}, {high:g}]", **kwargs)

    def violation(self, inputs, probs, *, soft, model=None, source_probs=None):
        if probs.shape[0] == 0:
            return probs.new_zeros(())
        if not 0 <= self.cls < probs.shape[1]:
            raise ValueError(f"selfheal: rule {self.name!r}: class {self.cls} out of range for {probs.shape[1]} classes")
        rate = probs[:, self.cls].mean() if soft else (probs.argmax(dim=1) == self.cls).float().mean()
        return torch.relu(self.low - rate) + torch.relu(rate - self.high)


class Monotonic(Rule):
    """The probability of ``cls`` never decreases (``increasing=True``) or
    never increases when input feature ``feature`` grows by ``step``, all
    else equal (e.g. "risk never decreases when age increases"). Violation:
    the mean amount by which rows move the wrong way (beyond ``slack``).
    Inputs are ``[N, F]`` rows; ``feature`` is a column index or a name in
    ``feature_names``."""

    needs_model = True

    def __init__(self, feature: Union[int, str], cls: int, *, increasing: bool = True, step: float = 1.0,
                 slack: float = 1e-4, feature_names: Optional[Sequence[str]] = None, name: Optional[str] = None,
                 **kwargs):
        if isinstance(feature, str):
            if feature_names is None or feature not in feature_names:
                raise ValueError(f"selfheal: Monotonic feature {feature!r} is not in feature_names")
            index = list(feature_names).index(feature)
        else:
            index = int(feature)
        if not step > 0:
            raise ValueError(f"selfheal: Monotonic step must be > 0, got {step}")
        self.feature, self.cls, self.increasing, self.step, self.slack = index, int(cls), increasing, float(step), slack
        direction = "increases" if increasing else "decreases"
        super().__init__(name or f"p(class {cls}) {direction} with feature {feature}", **kwargs)

    def violation(self, inputs, probs, *, soft, model=None, source_probs=None):
        if model is None:
            raise ValueError(f"selfheal: rule {self.name!r} needs the model (RuleContext.model)")
        if inputs.shape[0] == 0:
            return probs.new_zeros(())
        if inputs.dim() != 2 or not 0 <= self.feature < inputs.shape[1]:
            raise ValueError(f"selfheal: rule {self.name!r} needs [N, F] inputs with column {self.feature}, "
                             f"got shape {tuple(inputs.shape)}")
        moved = inputs.clone()
        moved[:, self.feature] += self.step
        change = model(moved)[:, self.cls] - probs[:, self.cls]
        wrong_way = -change if self.increasing else change
        return torch.relu(wrong_way - self.slack).mean()


class Forbidden(Rule):
    """Inputs matching ``where`` (a callable returning a boolean per row) must
    not be predicted as any of ``classes``. Violation: the share of matching
    rows predicted so; penalty: their mean probability on those classes."""

    def __init__(self, where: Callable[[torch.Tensor], torch.Tensor], classes: Sequence[int], *,
                 name: Optional[str] = None, **kwargs):
        if not callable(where):
            raise TypeError("selfheal: Forbidden needs a predicate callable over the inputs")
        self.where, self.classes = where, [int(c) for c in classes]
        if not self.classes:
            raise ValueError("selfheal: Forbidden needs at least one class")
        super().__init__(name or f"classes {self.classes} forbidden where predicate holds", **kwargs)

    def violation(self, inputs, probs, *, soft, model=None, source_probs=None):
        mask = _mask(self.where, inputs)
        if int(mask.sum()) == 0:
            return probs.new_zeros(())
        rows = probs[mask]
        if soft:
            return rows[:, self.classes].sum(dim=1).mean()
        banned = torch.zeros(probs.shape[1], dtype=torch.bool, device=probs.device)
        banned[self.classes] = True
        return banned[rows.argmax(dim=1)].float().mean()


class SourceAgreement(Rule):
    """On a protected slice (rows matching ``where``; all rows if None) the
    adapted model agrees with the source model's decisions on at least
    ``min_agreement`` of the rows. Penalty: KL(source || adapted) there."""

    needs_source = True

    def __init__(self, min_agreement: float = 0.95, *, where: Optional[Callable] = None,
                 name: Optional[str] = None, **kwargs):
        if not 0 < min_agreement <= 1:
            raise ValueError(f"selfheal: min_agreement must be in (0, 1], got {min_agreement}")
        self.min_agreement, self.where = float(min_agreement), where
        super().__init__(name or f"agrees with the source on >= {min_agreement:g} of the protected slice", **kwargs)

    def violation(self, inputs, probs, *, soft, model=None, source_probs=None):
        if source_probs is None:
            raise ValueError(f"selfheal: rule {self.name!r} needs the source model's probabilities")
        mask = _mask(self.where, inputs)
        if int(mask.sum()) == 0:
            return probs.new_zeros(())
        p, q = probs[mask], source_probs[mask].detach()
        if soft:
            return (q * (q.clamp_min(1e-12).log() - p.clamp_min(1e-12).log())).sum(dim=1).mean()
        agreement = (p.argmax(dim=1) == q.argmax(dim=1)).float().mean()
        return torch.relu(self.min_agreement - agreement)


class UserRule(Rule):
    """A rule from a callable ``fn(inputs, probs)`` returning the violation:
    a bool (True = satisfied), a number >= 0 (0 = satisfied), or a scalar
    tensor — differentiable ones also serve as the penalty."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any], name: str, **kwargs):
        if not callable(fn):
            raise TypeError("selfheal: UserRule needs a callable fn(inputs, probs)")
        self.fn = fn
        super().__init__(name, **kwargs)

    def violation(self, inputs, probs, *, soft, model=None, source_probs=None):
        value = self.fn(inputs, probs)
        if isinstance(value, bool):
            return probs.new_tensor(0.0 if value else 1.0)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"selfheal: user rule {self.name!r} must return a scalar, got shape "
                                 f"{tuple(value.shape)}")
            value = value.reshape(())
            if value.dtype == torch.bool:
                return probs.new_tensor(0.0 if bool(value) else 1.0)
            if not bool(torch.isfinite(value.detach())):
                raise ValueError(f"selfheal: user rule {self.name!r} returned a non-finite violation")
            return value.clamp_min(0.0)
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"selfheal: user rule {self.name!r} returned a non-finite violation")
        return probs.new_tensor(max(value, 0.0))


def check_rules(rules: Sequence[Rule], context: RuleContext) -> List[RuleResult]:
    return [rule.check(context) for rule in rules]


def total_penalty(rules: Sequence[Rule], context: RuleContext) -> Optional[torch.Tensor]:
    terms = [p for p in (rule.penalty(context) for rule in rules) if p is not None]
    return sum(terms) if terms else None


def validate_rules(rules) -> List[Rule]:
    rules = list(rules or [])
    for rule in rules:
        if not isinstance(rule, Rule):
            raise TypeError(f"selfheal: rules must be selfheal_ext.rules.Rule instances, got {type(rule).__name__} "
                            "(wrap a callable in UserRule(fn, name))")
    names = [rule.name for rule in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"selfheal: rule names must be unique, got {names}")
    return rules


class RuleError(RuntimeError):
    """A rule could not be evaluated (raised inside the healer, recorded there)."""
