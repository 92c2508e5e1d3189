"""Baseline defenses from the same line of work (FT, FT-SAM, NGF, salience + adaptive regularization)."""
