"""MetaSeg: segment an image by fitting only its pixels (Vyas et al., MICCAI 2025)."""
__version__ = "0.3.1"
