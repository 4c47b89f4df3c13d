"""The training stage: the loop, its state, checkpoints, and the builders of a run.

- ``state``: ``TrainState``, the loop's state (saved and restored in one place)
- ``checkpoint``: DCP checkpoints (atomic, safe to load, reshardable), the run hash, ``Checkpointer``
- ``progress``: the progress bar, log lines and TensorBoard scalars of the loop
- ``loop``: ``train_epochs``, the epochs of pipelined steps
- ``setup``: the run's data on every rank, its sharded model, a trained model from a checkpoint
"""
