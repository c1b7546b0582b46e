"""Cache policies: DBCache / DBPrune block caching with calibrators and step masks."""

from . import forecasts  # registers the issue-15 calibrators and the interval policy
from .calibrators import CALIBRATORS, Calibrator, FoCa, TaylorSeer, register_calibrator
from .masks import steps_mask

__all__ = ["CALIBRATORS", "Calibrator", "FoCa", "TaylorSeer", "register_calibrator", "forecasts", "steps_mask"]
