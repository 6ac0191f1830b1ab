"""Pipeline steps: each module does one concern with one infrastructure library.

Functions here are plain and testable; ``flows`` wraps them as Prefect tasks.
"""
