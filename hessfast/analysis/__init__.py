"""The analysis product (issue 11): one-call report, per-layer spectra, sharpness tracking."""
