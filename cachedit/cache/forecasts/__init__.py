"""Forecasts that hold over long skips (issue 15): timestep-distance Taylor with a stability guard,
HiCache's scaled-Hermite basis, FreqCa's frequency split, the fixed-interval policy and the searched
schedule policy. Each is
registered here under its name, so `CacheConfig(calibrator=..., policy=...)` and every sweep over
the registries find it."""

from ..calibrators import CALIBRATORS
from ..policies import POLICIES
from .frequency import FreqCa, FreqCaLow
from .hermite import HiCache
from .interval import Interval
from .schedule import Schedule
from .taylor import TimedTaylor, TimedTaylorSeer

CALIBRATORS.register("taylor_t", TimedTaylor)
CALIBRATORS.register("taylorseer_t", TimedTaylorSeer)
CALIBRATORS.register("hicache", HiCache)
CALIBRATORS.register("freqca", FreqCa)
CALIBRATORS.register("freqca_low", FreqCaLow)
POLICIES.register(Interval.name, Interval)
POLICIES.register(Schedule.name, Schedule)

__all__ = ["FreqCa", "FreqCaLow", "HiCache", "Interval", "Schedule", "TimedTaylor", "TimedTaylorSeer"]
