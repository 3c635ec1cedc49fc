"""The command line: ``python -m bench run|experts|report|status|list|evaluate|regress``.

``--plugin FILE_OR_MODULE`` (and ``$VLBENCH_PLUGINS``, and installed entry points; ``bench/plugins.py``)
loads methods, datasets and encoders from outside the repository before the command runs.

Exit codes: 0 all cells ok, 1 some cell failed, 2 bad usage or input (one error line, no traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from bench.errors import BenchError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise BenchError(f"{self.prog}: {message}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 100,200,500,1000, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one budget")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _limit(text: str) -> tuple[int, int]:
    vals = _int_list(text)
    if len(vals) != 2 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected N_TRAIN,N_EVAL images, got {text!r}")
    return vals  # type: ignore[return-value]


def _shard(text: str) -> tuple[int, int]:
    i, slash, n = text.partition("/")
    try:
        vals = int(i), int(n)
    except ValueError:
        vals = None
    if not slash or vals is None or vals[1] < 1 or not 0 <= vals[0] < vals[1]:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return vals


def _plugin_arg(r: argparse.ArgumentParser) -> None:
    r.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="a .py file or module that registers methods, datasets or encoders (repeatable; "
                        "also $VLBENCH_PLUGINS, separated by the OS path separator)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description="vlbench: VL dataset distillation vs coreset selection, one protocol.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a grid of cells (methods x budgets x seeds)")
    _protocol_args(r)
    r.add_argument("--methods", default="all", help="comma list of names, groups (coreset, distill), globs, or all")
    r.add_argument("--ipc", type=_int_list, default=(100, 200, 500, 1000), help="budgets in pairs, e.g. 100,200,500,1000")
    r.add_argument("--seeds", type=_positive, default=3, help="selection seeds per cell (default 3)")
    r.add_argument("--eval-seeds", type=_positive, default=1, help="eval seeds per selection seed (default 1)")
    r.add_argument("--out", type=Path, default=Path("runs"), help="results folder (default runs/)")
    r.add_argument("--force", action="store_true", help="redo finished cells")
    r.add_argument("--transfer", default="auto", metavar="auto|none|student.FIELD=VALUE[,...]",
                   help="the second student every set is also scored with (default auto: the other head, mlp "
                        "for the protocol's linear); none: no transfer score")
    r.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; compute nothing")
    r.add_argument("--no-fairness", action="store_true",
                   help="do not add the cells the fairness views compare against (random at every budget, "
                        "random under each set's treatment, random and herding at each set's bytes)")
    r.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="local: cells one after another here (default); ray: each cell a Ray task (requirements-ray.txt)")
    r.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="Ray cluster to join (default: start a local instance, or $RAY_ADDRESS)")
    r.add_argument("--ray-cpus", type=_positive, default=1, help="CPUs (torch threads) per Ray task (default 1)")
    r.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="run only cells at plan positions k with k %% N == I (SLURM arrays); every cell in exactly one shard")

    ex = sub.add_parser("experts", help="build (or resume) the expert trajectories the distillation methods use "
                        "(and forgetting's statistics)")
    _protocol_args(ex)
    ex.add_argument("--methods", default="distill", help="methods whose shared caches to build: distillation methods' "
                    "experts, forgetting's statistics (default: distill)")

    rep = sub.add_parser("report", help="tables and plots from stored results")
    rep.add_argument("--out", type=Path, default=Path("runs"))
    rep.add_argument("--published", action="store_true", help="add the paper's published rows (other protocol) where they exist")
    rep.add_argument("--no-sheets", dest="sheets", action="store_false",
                     help="skip the contact sheets (pictures of each distilled set; they read the dataset and its cached features)")
    rep.add_argument("--cache-dir", type=Path, default=None, help="feature cache for the contact sheets (default $VLBENCH_CACHE)")

    st = sub.add_parser("status", help="what is done, missing, failed")
    st.add_argument("--out", type=Path, default=Path("runs"))

    ls = sub.add_parser("list", help="list methods, datasets or encoders")
    ls.add_argument("what", choices=("methods", "datasets", "encoders"))
    ls.add_argument("pattern", nargs="?", default="*")
    _plugin_arg(ls)

    rg = sub.add_parser("regress", help="run the small fixed regression grid and compare it with the committed baseline")
    rg.add_argument("--config", default="auto", help="regression configuration: auto (flickr8k-small when ../shared "
                    "has Flickr8k, synthetic-small otherwise), flickr8k-small, synthetic-small")
    rg.add_argument("--update", action="store_true", help="write a new baseline (bench/baselines/NAME.json) for review")
    rg.add_argument("--reuse", action="store_true", help="check the last regression run's stored cells without rerunning")
    rg.add_argument("--out", type=Path, default=Path("runs/regress"), help="where the regression grid's cells go")
    rg.add_argument("--cache-dir", type=Path, default=None)

    ev = sub.add_parser("evaluate", help="score a saved artifact (a method's set) under its protocol")
    ev.add_argument("--artifact", type=Path, required=True)
    ev.add_argument("--seeds", type=_positive, default=3, help="eval seeds 0..N-1")
    ev.add_argument("--data-root", default=None, help="where the dataset lives on this machine, if moved")
    ev.add_argument("--cache-dir", type=Path, default=None)
    ev.add_argument("--device", default="cpu")
    _plugin_arg(ev)
    return p


def _protocol_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--dataset", default="synthetic", help="dataset name (python -m bench list datasets); default: synthetic")
    r.add_argument("--data-root", default=None, help="folder holding the dataset's caption file and images")
    r.add_argument("--test-split", default="test", choices=("test", "val"), help="score on test, or on val while developing")
    r.add_argument("--cut", default="heads", choices=("heads", "pixels", "frozen-pixels"),
                   help="where the student's trainable part starts (frozen-pixels: heads student, distilled images as pixels)")
    r.add_argument("--image-size", type=_positive, default=None, metavar="N",
                   help="pixels cuts: input resolution of the image tower (default 224)")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--cache-dir", type=Path, default=None, help="feature/expert cache (default $VLBENCH_CACHE or ~/.cache/vlbench)")
    r.add_argument("--limit", type=_limit, default=None, metavar="N_TRAIN,N_EVAL", help="use only the first images of each split")
    r.add_argument("--image-encoder", default="effnet_lite0")
    r.add_argument("--text-encoder", default="minilm_l6")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting: recipe.FIELD, student.FIELD or METHOD.FIELD (repeatable)")
    _plugin_arg(r)


def _apply_sets(args) -> tuple[object, object, dict]:
    from bench.protocol.student import StudentConfig
    from bench.protocol.training import Recipe
    from methods.base import parse_value

    student, recipe, methods = {}, {}, {}
    for item in args.set:
        key, eq, value = item.partition("=")
        scope, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise BenchError(f"--set expects SCOPE.FIELD=VALUE (e.g. recipe.epochs=20), got {item!r}")
        if scope in ("recipe", "student"):
            target = recipe if scope == "recipe" else student
            cls = Recipe if scope == "recipe" else StudentConfig
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if name not in fields:
                raise BenchError(f"{scope} has no field {name!r}; available: {', '.join(fields)}")
            target[name] = parse_value(value, fields[name].type, key)
        else:
            methods.setdefault(scope, {})[name] = value
    if "cut" in student:
        raise BenchError("set the cut with --cut heads|pixels|frozen-pixels, not --set student.cut")
    if args.image_size is not None:
        if student.get("image_size", args.image_size) != args.image_size:
            raise BenchError(f"--image-size {args.image_size} contradicts --set student.image_size={student['image_size']}")
        student["image_size"] = args.image_size
    return StudentConfig(cut=args.cut, **student), Recipe(**recipe), methods


def _transfer(text: str):
    """``--transfer``: "auto", None ("none"), or a dict of student fields (``student.head=mlp,...``)."""
    from bench.protocol.student import StudentConfig
    from methods.base import parse_value

    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    fields = {f.name: f for f in dataclasses.fields(StudentConfig)}
    out = {}
    for item in text.split(","):
        key, eq, value = item.strip().partition("=")
        name = key[len("student."):] if key.startswith("student.") else key
        if not eq or name not in fields or name == "cut":
            raise BenchError(f"--transfer expects auto, none or student.FIELD=VALUE (fields: "
                             f"{', '.join(f for f in fields if f != 'cut')}), got {item!r}")
        out[name] = parse_value(value, fields[name].type, f"--transfer {key}")
    return out  # values are checked against the protocol's student when the run starts


def _protocol_config(args):
    from bench.protocol import ProtocolConfig

    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise BenchError("--device cuda was asked for, but torch sees no CUDA device here")
    elif args.device != "cpu":
        raise BenchError(f"unknown --device {args.device!r}; available: cpu, cuda, cuda:N")
    student, recipe, method_opts = _apply_sets(args)
    pcfg = ProtocolConfig(dataset=args.dataset, data_root=args.data_root, test_split=args.test_split, limit=args.limit,
                          image_encoder=args.image_encoder, text_encoder=args.text_encoder, student=student, recipe=recipe)
    return pcfg, method_opts


def cmd_experts(args) -> int:
    from bench.protocol import build_protocol
    from methods.tm.experts import ExpertBuffer
    from datasets.features import default_cache_dir
    from methods import METHODS
    from methods.base import MethodContext, method_config, prepare

    pcfg, method_opts = _protocol_config(args)
    configs = {name: method_config(METHODS.get(name), method_opts.get(name, {}))  # checked before any data
               for name in METHODS.select(args.methods)}
    protocol = build_protocol(pcfg, args.cache_dir, args.device)
    seen = set()
    for name, cfg in configs.items():
        cls = METHODS.get(name)
        if not hasattr(cfg, "experts"):
            if hasattr(cls, "prepare"):  # another shared cache (forgetting's statistics): build it here too
                prepare(cls(cfg), MethodContext(protocol, args.cache_dir, args.device))
                print(f"{name}: cached statistics ready under {args.cache_dir or default_cache_dir()}")
                seen.add(name)
            continue
        ecfg = cfg.experts()
        if ecfg in seen:
            continue
        seen.add(ecfg)
        buf = ExpertBuffer(protocol, ecfg, args.cache_dir or default_cache_dir()).build()
        print(f"{name}: {ecfg.n_experts} experts x {ecfg.epochs} epochs ready in {buf.dir} "
              f"({buf.disk_bytes() / 2**20:.1f} MiB)")
    if not seen:
        raise BenchError(f"no distillation method (or forgetting) among {args.methods!r}; nothing to build")
    return 0


def cmd_run(args) -> int:
    from bench.executors import ExecutorConfig
    from bench.runner import RunConfig, execute

    if args.executor != "ray" and (args.ray_address is not None or args.ray_cpus != 1):
        raise BenchError("--ray-address and --ray-cpus need --executor ray")
    pcfg, method_opts = _protocol_config(args)
    run = RunConfig(protocol=pcfg, methods=args.methods, budgets=args.ipc, seeds=args.seeds, eval_seeds=args.eval_seeds,
                    out=args.out, force=args.force, device=args.device, cache_dir=args.cache_dir,
                    method_options=method_opts, argv=sys.argv, shard=args.shard, plugins=args.plugin_paths,
                    transfer=_transfer(args.transfer), fairness=not args.no_fairness,
                    executor=ExecutorConfig(kind=args.executor, address=args.ray_address, cpus_per_task=args.ray_cpus))
    if args.dry_run:
        from bench.runner import dry_run
        dry_run(run)
        return 0
    _, recs = execute(run)
    failed = [r for r in recs if r.get("status") != "ok"]
    part = f"shard {args.shard[0]}/{args.shard[1]}: " if args.shard else ""
    print(f"{part}{len(recs) - len(failed)} cells ok, {len(failed)} failed; results in {args.out}/cells "
          f"(python -m bench report --out {args.out})")
    return 1 if failed else 0


def cmd_report(args) -> int:
    from reports import write_report

    paths = write_report(args.out, include_published=args.published)
    if args.sheets:
        from bench.runner import contact_sheets
        paths += contact_sheets(args.out, cache_dir=args.cache_dir)
    print(f"report written to {Path(args.out) / 'report'}:")
    for p in paths:
        print(f"  {p}")
    return 0


def cmd_status(args) -> int:
    from bench.results import status_lines

    lines, code = status_lines(args.out)
    print("\n".join(lines))
    return code


def cmd_list(args) -> int:
    if args.what == "methods":
        import methods  # noqa: F401  (registers)
        from methods import METHODS as reg
    elif args.what == "datasets":
        from datasets.registry import DATASETS as reg
    else:
        from datasets.encoders import ENCODERS as reg
    for name in reg.names(args.pattern):
        e = reg.entry(name)
        print(f"{name:16s} {','.join(e.groups):10s} {e.help}")
    if args.what == "encoders":
        print("timm:<model>[@ckpt] image; hf:<name-or-path>[@mean|@cls] text; open_clip:<arch>[:<pretrained>] either (need their weights)")
    return 0


def cmd_evaluate(args) -> int:
    from bench.runner import protocol_of_artifact
    from methods.base import Artifact

    art, meta = Artifact.load(args.artifact)
    protocol = protocol_of_artifact(meta, args.artifact, args.cache_dir, args.data_root, args.device,
                                    log=lambda m: print(m, file=sys.stderr))
    if protocol.id != meta.get("protocol_id"):
        print(f"warning: protocol id {protocol.id} differs from the artifact's {meta.get('protocol_id')} "
              f"(data or encoders changed)", file=sys.stderr)
    budget = meta.get("budget") if isinstance(meta.get("budget"), int) else len(art)
    try:
        art.validate(protocol, budget)
    except RuntimeError as e:  # the set does not fit its protocol's train split
        raise BenchError(f"artifact {args.artifact} does not fit its protocol: {e}") from None
    import numpy as np

    def scored(per_seed: list[dict]) -> dict:
        keys = [k for k in per_seed[0] if k not in ("seed", "lr", "train_s")]
        return {"metrics_mean": {k: float(np.mean([m[k] for m in per_seed])) for k in keys},
                "metrics_std": {k: float(np.std([m[k] for m in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0
                                for k in keys},
                "metrics_per_seed": per_seed}

    err = lambda m: print(m, file=sys.stderr)  # noqa: E731
    seeds = list(range(args.seeds))
    native = art.native_recipe()
    summary = {"artifact": str(args.artifact), "method": meta.get("method"), "budget": budget, "protocol_id": protocol.id,
               "storage_bytes": art.storage_bytes(protocol),
               **scored(protocol.evaluate(art.pairs(protocol), seeds, log=err, recipe=native))}
    if native is not None:  # a set with learned targets: scored natively (above) and plainly
        summary["native"] = native
        summary["plain"] = scored(protocol.evaluate(art.pairs(protocol, plain=True), seeds, log=err))
    print(json.dumps(summary, indent=1))
    return 0


def cmd_regress(args) -> int:
    from bench import regress
    from bench.manifest import manifest
    from methods import METHODS

    cfg = regress.get_config(args.config)
    if cfg.data_root and not Path(cfg.data_root).exists():
        raise BenchError(f"regression configuration {cfg.name} needs {cfg.data_root}; use --config synthetic-small")
    out = Path(args.out) / cfg.name
    if args.reuse:
        from bench.protocol import ProtocolConfig, build_protocol
        pcfg = ProtocolConfig(dataset=cfg.dataset, data_root=cfg.data_root, test_split=cfg.test_split, limit=cfg.limit)
        pid = build_protocol(pcfg, args.cache_dir, log=None).id
        summary = regress.summarise(pid, regress.load_cells(out, pid, cfg))
    else:
        summary = regress.run_grid(cfg, out, args.cache_dir)
    path = regress.baseline_path(cfg.name)
    if args.update:
        regress.write_baseline(path, regress.make_baseline(cfg, summary, manifest("cpu", sys.argv)))
        print(f"baseline written to {path}: review it (git diff) and commit it")
        return 0
    rows, findings = regress.check(summary, regress.read_baseline(path), METHODS.select("distill"))
    text, passed = regress.report(rows, findings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "regress.txt").write_text(text + "\n")
    print(f"regression check {cfg.name} against {path}:")
    print(text)
    return 0 if passed else 1


COMMANDS = {"run": cmd_run, "regress": cmd_regress, "experts": cmd_experts, "report": cmd_report, "status": cmd_status, "list": cmd_list, "evaluate": cmd_evaluate}


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "plugin"):
            from bench.plugins import load_plugins, plugin_specs

            loaded = load_plugins(plugin_specs(args.plugin))
            args.plugin_paths = tuple(rec["plugin"] for rec in loaded)  # files absolute, for Ray workers
        return COMMANDS[args.command](args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; rerun the same command to resume", file=sys.stderr)
        return 130
