"""Data: dataset readers (Karpathy JSON, COCO captions, a folder with ``captions.jsonl``), the
embedded procedural dataset, the frozen encoders and the feature and pixel caches.

May import: the leaf modules ``bench.errors``, ``bench.progress`` and ``bench.registry``; nothing
else of the project (the protocol and the methods build on this package, never the other way).
"""
