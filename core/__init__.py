"""DenseAlign core: shared by the app, the workers and the trainer; imports none of them."""

__version__ = "0.1.0"
