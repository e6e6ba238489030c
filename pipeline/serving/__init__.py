"""Serving a trained model: export a checkpoint as a plain CPU model (float or int8 tables) and score raw rows
with it."""
