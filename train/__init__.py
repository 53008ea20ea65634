"""jaxlab train."""
