"""Generated click logs with a known click probability: a synthetic Criteo-format log and a MovieLens-style
user-item log. Each writes train/val/test TSV and ``optimum.json`` (the Bayes-optimal metrics of its
held-out splits) through the shared scaffold in :mod:`.base`."""
