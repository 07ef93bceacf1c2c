"""Exporters from a model directory to other runtimes' formats."""
