"""Methods: one module per family, each registering itself; importing this package registers them all.

``base`` holds the contract (``register_method``, ``Artifact``, ``MethodContext``); ``tm/`` the
trajectory-matching engine behind ``trajectory_matching``. Methods from outside the repository
register through the same ``register_method`` (``bench/plugins.py``).

May import: ``bench.protocol`` (the student, the recipe), ``datasets`` and the leaf modules
``bench.errors`` / ``bench.progress`` / ``bench.registry``; never the harness (``bench.cli``,
``bench.runner``, ...).
"""
from methods.base import METHODS, Artifact, MethodContext, register_method  # noqa: F401
from methods import covmatch, crash, forgetting, full, herding, kcenter, lors, mdm, random_subset, trajectory_matching  # noqa: F401
