"""Data: text into MDS shards (``prepare``, ``python -m prefix.data``), tokenizers, the streaming loaders."""

from prefix import exports

__getattr__, __dir__ = exports(
    __name__,
    loader=['build_dataloader', 'count_tokens', 'dataset_info'],
)
