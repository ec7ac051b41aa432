"""Shared ground floor: the config error, the component registries, crash-safe weight files, figure helpers.
Imports nothing else of the package."""
