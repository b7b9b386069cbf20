"""Prefect flows and the rfatlas command line."""
