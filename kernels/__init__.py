"""jaxlab kernels."""
