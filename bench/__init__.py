"""vlbench: vision-language dataset distillation against coreset selection, under one protocol.

This package is the harness: the CLI, the runner and its executors, the results store (and
``status``), manifests, the regression check, the registry, plugin loading, errors and progress.
``bench.protocol`` holds what decides a score apart from the method.

Imports run one way: the harness -> ``methods`` -> ``bench.protocol`` -> ``datasets``. The leaf
modules ``bench.errors``, ``bench.progress`` and ``bench.registry`` import nothing of the project's
and every package may import them; this ``__init__`` imports nothing.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
