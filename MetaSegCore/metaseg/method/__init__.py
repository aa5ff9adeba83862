"""The method of the paper: the network, the test-time fit, weights files, intensity normalization and grids,
label decoding, reproducibility and the device. It imports only io/ and labelsets.py, never space/, train/,
cohort/, the API or the command line."""
