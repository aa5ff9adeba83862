"""The package's version: here, below everything, so that any part can name it without importing the package's
face (metaseg/__init__.py, which imports the API). pyproject.toml reads it from this file."""

__version__ = "0.10.0"
