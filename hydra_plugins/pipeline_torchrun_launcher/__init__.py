"""Hydra launcher plugin: every sweep point (``-m``) is its own torchrun job.

``hydra_plugins`` is a namespace package (no ``__init__.py`` one level up): Hydra imports every module
under it at start, so this plugin is found whenever the repository root is on ``sys.path``
(``pipeline/train.py`` puts it there). Selected by ``pipeline/conf/hydra/launcher/torchrun.yaml``, which
pipeline/conf/train.yaml makes the default launcher.
"""
