"""Thin Prefect tasks over rfcore."""
