"""Verification: hashing (one place), the known-hash table, checklists; the ``verify`` command on top."""
