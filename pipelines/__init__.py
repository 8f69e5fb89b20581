"""Spark stages for catalog-semantic-ids.

Every stage is a plain function ``DataFrame -> DataFrame`` (or -> a small result object) that uses
only DataFrame / SQL APIs available on both classic Spark and Spark Connect. The edges the stages
need live in their own modules: :mod:`pipelines.session` builds sessions, :mod:`pipelines.io` owns
table IO, :mod:`pipelines.registry` owns MLflow; column names live in :mod:`pipelines.schema`.
"""
