"""Outputs: staging (journal, atomic swap), the recipe, and the writers for each format."""
