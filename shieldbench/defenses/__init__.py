"""Defenses: hooks into data preparation, the objective, callbacks, repair."""
