"""The shipped Hydra configs (package data): one folder per group, ``train.yaml`` the primary config."""
