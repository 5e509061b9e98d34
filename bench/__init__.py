"""hubmerge's benchmark (``python -m bench.run``): not part of the package nor of the test suite."""
