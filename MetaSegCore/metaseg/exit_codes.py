"""Exit codes of the command line and of `metaseg batch`: here, so that neither imports the other for them."""

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 3
