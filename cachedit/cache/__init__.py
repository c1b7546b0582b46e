"""Cache policies: DBCache / DBPrune block caching with calibrators and step masks."""

from .calibrators import CALIBRATORS, Calibrator, FoCa, TaylorSeer, register_calibrator
from .masks import steps_mask

__all__ = ["CALIBRATORS", "Calibrator", "FoCa", "TaylorSeer", "register_calibrator", "steps_mask"]
