"""Readers of on-disk formats: each turns files into PairSet / LabelledSet / RetrievalSet with lazy images."""
