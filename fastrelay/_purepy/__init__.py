"""Pure-Python twins of the Cython hot paths in fastrelay._core: the spec they must match."""
