"""Test and demo machinery, not the product: the local Hub server and tiny real-format models.

Nothing under ``hubmerge`` outside this package imports it (except the ``demo`` command, lazily).
"""
