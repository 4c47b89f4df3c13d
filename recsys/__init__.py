"""recsys: recommendation embeddings trained with TorchRec on GPU clusters (and CPUs)."""

__version__ = "0.1.0"
