"""Training: `metaseg prepare` (data packs), meta-training, and `convert-weights` for old pickled weights."""
