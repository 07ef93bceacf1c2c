"""Corpus handling: reading documents, packing token streams for pretraining."""
