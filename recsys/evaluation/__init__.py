"""The evaluation stage: exact full-ranking Recall@K / NDCG@K of a (sharded) model.

- ``ranking``: the metric kernel (blocks of users x items, exact top K, masks)
- ``vectors``: tower outputs of a sharded model for any rows (also used by stacking and export)
- ``metrics``: a model or the popularity baseline on an evaluation split; the per-epoch evaluation
"""
