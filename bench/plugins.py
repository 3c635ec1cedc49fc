"""Methods, datasets and encoders from outside the repository.

A plugin is a Python file or an importable module that registers through the public API
(``methods.register_method``, ``datasets.registry.DATASETS.register``,
``datasets.encoders.ENCODERS.register``). Three ways in, loaded in this order, each module once:

* ``--plugin FILE_OR_MODULE`` (repeatable) on ``run``, ``experts``, ``list`` and ``evaluate``;
* ``$VLBENCH_PLUGINS``: the same, separated by ``os.pathsep``;
* installed packages' entry points in the groups ``vlbench.methods``, ``vlbench.datasets`` and
  ``vlbench.encoders`` (``[project.entry-points."vlbench.methods"] mine = "my_pkg.methods"``).

Each name a plugin registers is attributed to it: ``origin(kind, name)`` gives the plugin's module,
file, sha256 of the file and version. A method's cells record that and hash the file's sha256 into
their key, so an edited plugin file never reuses an old cell. A name that is already registered
(a built-in or another plugin) is one clear error naming both.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional

from bench.errors import BenchError

GROUPS = ("vlbench.methods", "vlbench.datasets", "vlbench.encoders")
_ORIGIN: dict[tuple[str, str], dict] = {}  # (kind, name) -> plugin record
_LOADED: dict[str, dict] = {}  # module name -> plugin record


def _registries() -> dict[str, object]:
    import methods  # noqa: F401  (the built-ins register first, so a clash with one is found)
    from datasets.encoders import ENCODERS
    from datasets.registry import DATASETS
    from methods.base import METHODS

    return {"method": METHODS, "dataset": DATASETS, "encoder": ENCODERS}


def _sha256(path: Optional[str]) -> Optional[str]:
    from datasets.base import file_hash

    return file_hash(path) if path and os.path.isfile(path) else None


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def _file_module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    return f"vlbench_plugin_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _import(spec: str, regs: dict, where: str, version: Optional[str] = None) -> dict:
    """Import one plugin; attribute every name it registers to it."""
    if _is_file(spec):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise BenchError(f"plugin file not found: {spec} ({where})")
        name = _file_module_name(path)
    else:
        path, name = None, spec
    if name in _LOADED:
        return _LOADED[name]
    before = {kind: set(reg.names()) for kind, reg in regs.items()}
    try:
        if path is not None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module  # dataclasses and pickling look the module up by name
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            module = importlib.import_module(name)
    except BenchError:
        raise
    except ModuleNotFoundError as e:
        if path is None and e.name == name.split(".")[0]:
            raise BenchError(f"plugin module {name!r} not found ({where}); give a file path (my_method.py) "
                             f"or a module on sys.path") from None
        raise BenchError(f"plugin {spec}: {type(e).__name__}: {e}") from None
    except ValueError as e:  # the registry refuses a name that exists
        raise BenchError(f"plugin {spec}: {e}") from None
    except Exception as e:
        raise BenchError(f"plugin {spec} failed to import: {type(e).__name__}: {e}") from None
    file = getattr(module, "__file__", None)
    rec = {"plugin": spec if path is None else str(path), "module": name, "file": file,
           "sha256": _sha256(file), "version": version or getattr(module, "__version__", None)}
    _LOADED[name] = rec
    for kind, reg in regs.items():
        for added in set(reg.names()) - before[kind]:
            _ORIGIN[(kind, added)] = rec
    return rec


def plugin_specs(cli: Iterable[str] = ()) -> list[str]:
    """The plugins asked for: the CLI's, then ``$VLBENCH_PLUGINS``'s."""
    env = [s for s in os.environ.get("VLBENCH_PLUGINS", "").split(os.pathsep) if s.strip()]
    return [s.strip() for s in [*cli, *env]]


def load_plugins(specs: Iterable[str] = (), entry_points: bool = True) -> list[dict]:
    """Import the given plugins (files or modules), then the installed entry points; each once.
    Returns the records of the plugins loaded by this call or earlier."""
    regs = _registries()
    for spec in specs:
        _import(spec, regs, "--plugin / $VLBENCH_PLUGINS")
    if entry_points:
        for group in GROUPS:
            for ep in metadata.entry_points(group=group):
                version = ep.dist.version if getattr(ep, "dist", None) is not None else None
                _import(ep.value.split(":")[0], regs, f"entry point {ep.name!r} in group {group}", version)
    return list(_LOADED.values())


def origin(kind: str, name: str) -> Optional[dict]:
    """The plugin that registered ``name`` (``kind``: method, dataset, encoder), or None for a built-in."""
    return _ORIGIN.get((kind, name))


def reset() -> None:
    """Forget every plugin: unregister what they registered and drop their modules, so that a later
    ``load_plugins`` in the same process imports the files again (``main(argv)`` called twice)."""
    regs = _registries()
    for (kind, name), rec in list(_ORIGIN.items()):
        regs[kind].unregister(name)
        sys.modules.pop(rec["module"], None)  # imported afresh (and registering again) next time
    _ORIGIN.clear()
    _LOADED.clear()


def loaded() -> list[dict]:
    """Every plugin loaded in this process (recorded in each cell's manifest)."""
    return list(_LOADED.values())
