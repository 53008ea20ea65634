"""jaxlab eval: evaluation code (calibration: RLCR calibration metrics and test-time scaling)."""
