"""The data stage: raw interactions -> a prepared dataset -> batches and evaluation sets.

Modules, in the order data flows through them:

- ``readers``: source formats (Parquet, CSV, LightGCN text, MovieLens) -> Arrow, errors naming file and line/column
- ``hashing``: integer arithmetic on raw ids that every engine computes identically (split keys, hashed rows)
- ``synthetic``: the seeded synthetic logs
- ``steps``: the preparation as SQL steps (one text for DuckDB and Spark)
- ``layout``: the prepared layout both engines write and both loaders read
- ``engine``: the front ends (sources as Parquet) and the DuckDB executor of the steps
- ``spark_engine``: the Spark executor of the same steps (optional: pyspark)
- ``prepare``: a prepared dataset (vocabularies or hashed ids, split, manifest), reused when identical
- ``dataset``: a prepared dataset in memory, CSR lists, raw ids of the rows
- ``features``: model inputs as KeyedJaggedTensors (ids and history bags)
- ``batches``, ``loader``: an epoch's training batches, in memory or streamed from row groups
- ``eval_sets``: what each evaluated user has in training and in test
- ``source``: the one interface the later stages read a prepared dataset through
"""
