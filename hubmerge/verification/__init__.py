"""Verification: hashing (one place), the known-hash table, checklists. The ``verify`` command is hubmerge.verify."""
