"""The shipped backend conformance suite, run over every installed backend as part of the project's tests."""

from cachedit.testing.conformance import *  # noqa: F401,F403
