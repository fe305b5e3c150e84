"""Synthetic 12-lead ECG printouts: the built-in default data and the test fixture."""
