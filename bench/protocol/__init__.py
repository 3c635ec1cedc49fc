"""The protocol: everything that decides a score apart from the method.

Holds the protocol's parts: ``core`` (``ProtocolConfig``, ``Protocol``, the protocol id, ``evaluate``:
fresh student per eval seed, the recipe, one score at the last epoch), ``student`` (projection heads
and the contrastive loss), ``training`` (the recipe and its batching), ``retrieval`` (R@K with FAISS
and a torch reference), ``towers`` (the trainable image towers of the pixels cut) with their
differentiable ops ``conv_ops`` and ``kinks``.

May import: ``datasets`` and the leaf modules ``bench.errors`` / ``bench.progress``; never the
harness (``bench.cli``, ``bench.runner``, ...) or ``methods``.
"""
from bench.protocol.core import CutSplit, Protocol, ProtocolConfig, build_protocol  # noqa: F401

__all__ = ["CutSplit", "Protocol", "ProtocolConfig", "build_protocol"]
