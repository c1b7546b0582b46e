"""Forecasts that hold over long skips (issue 15): timestep-distance Taylor with a stability guard,
HiCache's scaled-Hermite basis, FreqCa's frequency split, the fixed-interval policy and the searched
schedule policy. Each is
registered here under its name, so `CacheConfig(calibrator=..., policy=...)` and every sweep over
the registries find it."""

from ..calibrators import register_calibrator
from ..policies import register_policy
from .frequency import FreqCa, FreqCaLow
from .hermite import HiCache
from .interval import Interval
from .schedule import Schedule
from .taylor import TimedTaylor, TimedTaylorSeer

register_calibrator("taylor_t", TimedTaylor)
register_calibrator("taylorseer_t", TimedTaylorSeer)
register_calibrator("hicache", HiCache)
register_calibrator("freqca", FreqCa)
register_calibrator("freqca_low", FreqCaLow)
register_policy(Interval)
register_policy(Schedule)

__all__ = ["FreqCa", "FreqCaLow", "HiCache", "Interval", "Schedule", "TimedTaylor", "TimedTaylorSeer"]
