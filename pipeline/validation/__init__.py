"""Cleaning rules, the deterministic split and the Great Expectations suites."""
