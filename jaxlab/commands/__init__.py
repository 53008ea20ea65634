"""Command-line command groups (see jaxlab/cli.py)."""
