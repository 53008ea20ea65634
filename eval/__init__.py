"""jaxlab eval."""
