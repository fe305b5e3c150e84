"""Console scripts; each is a thin wrapper around the library."""
