"""The data stage: raw interactions -> a prepared dataset -> batches and evaluation sets.

Modules, in the order data flows through them:

- ``readers``: source formats (Parquet, CSV, LightGCN text, MovieLens) -> Arrow, errors naming file and line/column
- ``hashing``: stable hashes of raw ids (hashed rows, the streamed split)
- ``synthetic``: the seeded synthetic logs
- ``prepare``: a prepared dataset (vocabularies or hashed ids, split, manifest), reused when identical
- ``stream_prepare``: the two-pass streaming preparation of large sources
- ``dataset``: a prepared dataset in memory, CSR lists, raw ids of the rows
- ``features``: model inputs as KeyedJaggedTensors (ids and history bags)
- ``batches``, ``loader``: an epoch's training batches, in memory or streamed from row groups
- ``eval_sets``: what each evaluated user has in training and in test
- ``source``: the one interface the later stages read a prepared dataset through
"""
