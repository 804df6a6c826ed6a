"""Tuning, the part the compile needs: the database, applying its records, building and measuring candidates.

The tuner itself (tasks, search, the ``tune`` command) sits above the stages, in pipeline.tune.
"""
