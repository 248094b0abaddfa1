"""DenseAlign app."""
