"""cachedit's exact reference backend for CPUs: every feature runs and is checkable here."""
