"""Run-level helpers used by the entry scripts (train.py, scripts/*): never by models."""
