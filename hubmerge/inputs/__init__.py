"""Inputs: resolve a spec (Hub ID or folder) to a pinned source and fetch its files."""
