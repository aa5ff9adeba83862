"""`metaseg batch`: the scans of a cohort, their ids and shards, the volumes table, and the runner."""
