"""DenseAlign worker."""
