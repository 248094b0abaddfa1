"""DenseAlign trainer."""
