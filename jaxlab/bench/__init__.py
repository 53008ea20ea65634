"""Benchmarks behind `jaxlab bench ...`; results are recorded in docs/benchmarks.md."""
