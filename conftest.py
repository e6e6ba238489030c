"""Root pytest conftest.

Its presence makes pytest put the repository root on sys.path, so tests can
`import pipeline` with plain `pytest` as well as `python -m pytest`.
"""
