"""tagway's way back in: select a tagged slice of production calls (or a pinned dataset), replay it against
candidate models and prompts through the gateway, score each case, and report and gate per segment.

Depends on `exporters` only; the gateway is reached over HTTP or as an ASGI app imported by name at run time.
"""
from .evaluators import REGISTRY, EvalContext, EvalResult, EvaluatorSpec, evaluate
from .gate import Verdict, evaluate_gate
from .report import Report, aggregate, render, wilson
from .slice import Case, EmptySliceError, sample, select_slice
from .spec import ReplaySpec, SpecError, load_spec, parse_spec

__all__ = ["REGISTRY", "EvaluatorSpec", "EvalContext", "EvalResult", "evaluate", "Verdict", "evaluate_gate", "Report", "aggregate",
           "render", "wilson", "Case", "EmptySliceError", "sample", "select_slice", "ReplaySpec", "SpecError",
           "load_spec", "parse_spec"]
