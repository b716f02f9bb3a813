"""Shared test configuration."""

from hypothesis import settings

# Hypothesis examples are derived from the test itself, not drawn at random, so a
# fresh clone in CI runs exactly the examples that ran here.
settings.register_profile("chronotope", derandomize=True, deadline=None)
settings.load_profile("chronotope")
