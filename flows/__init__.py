"""Prefect flows: they compose the plain functions of ``tasks`` and add nothing else."""
