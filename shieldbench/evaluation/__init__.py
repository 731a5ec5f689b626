"""Evaluation: metrics and evaluators for clean utility and backdoor success."""
