"""Methods: one module per family; importing this package registers them all."""
from methods.base import METHODS, Artifact, MethodContext, register_method  # noqa: F401
from methods import crash, forgetting, full, herding, kcenter, random_subset, trajectory_matching  # noqa: F401
