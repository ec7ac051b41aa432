"""Studies: multirun jobs (``sweep``: job folders, failure records), their tables and plots (``python -m
vittm.studies.report``) and the tuning choice (``python -m vittm.studies.tune``). Reads what runs write; imports
core only (and torch-free where it can)."""
