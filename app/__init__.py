"""DenseAlign web app: labelling UI, admin pages and the REST API. Never imports torch."""
