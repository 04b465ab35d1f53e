"""The gate's statistics, pure functions (no I/O), each citing its method where it is defined:

- paired tests (`paired`): the paired 2x2 table of a segment, the one-sided exact McNemar / sign test on the
  discordant pairs, Newcombe's hybrid score interval for the paired difference, Wilson per side;
- multiplicity (`multiplicity`): Holm across segments, and across families then within;
- sequential escalation (`sequential`, `escalation`): planned looks, alpha spending (Lan-DeMets, power family
  rho = 3), which inconclusive segments get more cases;
- power and planning (`power`): cases needed for a drop at 80% power, the smallest detectable drop;
- verdicts (`verdicts`): regression / ok / inconclusive per segment and family, and the exit code;
- locks (`locks`): a locked dataset case that does not keep its expected outcome is a regression regardless.
"""
from .escalation import SegmentPlan, next_draws, plan
from .locks import BROKEN, HELD, UNDECIDED, LockResult, check_locks
from .multiplicity import holm, holm_adjusted
from .paired import Pairs, binom_sf_half, newcombe_interval, pairs_from, sign_test_drop, wilson_interval
from .power import POWER, cases_needed, detectable_drop, independent_discordance
from .sequential import look_schedule, sequential_p, spending_weights
from .verdicts import (EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INCONCLUSIVE, EXIT_PASS, EXIT_REGRESSION, INCONCLUSIVE,
                       OK, REGRESSION, Decision, Evidence, Finding, classify, decide, exit_code)

__all__ = ["Pairs", "pairs_from", "binom_sf_half", "sign_test_drop", "newcombe_interval", "wilson_interval", "holm",
           "holm_adjusted", "look_schedule", "spending_weights", "sequential_p", "SegmentPlan", "plan",
           "next_draws", "POWER", "cases_needed", "detectable_drop", "independent_discordance", "REGRESSION", "OK",
           "INCONCLUSIVE", "Evidence", "Finding", "Decision", "classify", "decide", "exit_code", "EXIT_PASS",
           "EXIT_REGRESSION", "EXIT_BAD_INPUT", "EXIT_INCOMPLETE", "EXIT_INCONCLUSIVE", "LockResult", "check_locks",
           "HELD", "BROKEN", "UNDECIDED"]
