"""Built-in criteria. Each is registered in ``pyproject.toml`` under ``compressor.criteria``."""
