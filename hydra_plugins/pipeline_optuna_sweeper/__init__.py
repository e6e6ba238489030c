"""Hydra sweeper plugin: Optuna's search (hydra-optuna-sweeper's search-space syntax and samplers), resumable.

Registers ``hydra/sweeper=pipeline_optuna`` when Hydra scans ``hydra_plugins``; ``pipeline/conf/tune/default.yaml``
selects it (``./launch.sh tune``). Keep the imports light: every Hydra start imports this package.
"""
