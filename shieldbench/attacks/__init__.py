"""Attacks: plan poisons and apply triggers; they know nothing about training."""
