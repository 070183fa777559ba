"""The index service: the system of record for datasets, items and vector collections."""
