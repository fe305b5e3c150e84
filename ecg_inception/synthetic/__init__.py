"""Synthetic 12-lead ECG printouts: the built-in default data and the test fixture.

`waveforms` draws class-specific 12-lead signals (mV), `printout` renders them as a report page shaped like the
Mendeley scans, and `generate.generate_dataset` writes Mendeley-named class folders with planted duplicates;
`default_set.ensure_synthetic_dataset` makes (once) the set `EcgDataModule` uses when no root is given.
"""
