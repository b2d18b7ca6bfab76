"""Command-line interface: ``cfbench run | list | leaderboard | report | doctor``.

Usage errors (unknown names, bad values, missing datasets) print one clear message naming
the bad value and the valid choices, and exit with status 2.  A run that fails after it
started is recorded as failed and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import CfbenchError, PluginError, UsageError


def _fmt(m) -> str:
    if m is None:
        return "n/a"
    if isinstance(m, dict):
        v = m.get("value")
        if v is None:
            return "n/a"
        if m.get("ci_low") is not None:
            return f"{100 * v:6.2f}%  [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]  n={m.get('n')}"
        return f"{v:.4g}"
    if isinstance(m, float):
        return f"{m:.4g}"
    return str(m)


SUMMARY_KEYS = [
    ("clean.accuracy", "clean accuracy"),
    ("robust.pgd.accuracy", "PGD robust accuracy"),
    ("robust.autoattack.sanity.pgd_accuracy", "PGD on AutoAttack's examples"),
    ("robust.autoattack.accuracy", "AutoAttack robust accuracy"),
    ("robust.attacks.worst_case.accuracy", "attack zoo (worst case)"),
    ("mia.best.auc", "membership: best AUC"),
    ("mia.best.tpr_at_fpr.0.01", "membership: best TPR @ 1% FPR"),
    ("mia.best.tpr_at_fpr.0.001", "membership: best TPR @ 0.1% FPR"),
    ("dp.epsilon", "DP epsilon"),
]


def print_summary(rec: dict, run_dir: Path, reused: bool) -> None:
    cfg = rec["config"]
    print()
    print(f"run      {rec['run_id']}" + ("   (reused: same config hash, not recomputed)" if reused else ""))
    print(f"defense  {cfg['defense']['name']}  {cfg['defense']['params']}")
    print(f"data     {cfg['dataset']['name']}  model {cfg['model']['name']}  threat {cfg['threat']['norm']} "
          f"eps={cfg['threat']['eps']:.4g}  seed {cfg['seed']}")
    width = max(len(label) for _, label in SUMMARY_KEYS)
    metrics = rec.get("metrics", {})
    print("-" * (width + 40))
    for key, label in SUMMARY_KEYS:
        if key in metrics:
            m = metrics[key]
            if key.startswith("mia.best.") and isinstance(m, dict) and m.get("attack") and m.get("value") is not None:
                print(f"{label:<{width}}  {_fmt(m)}  ({m['attack']})")
            else:
                print(f"{label:<{width}}  {_fmt(m)}")
    # the protocol's primary attack, pooled over the target and its reference models: the
    # headline leakage (the rows above are single-target and selection-biased)
    primary = (((cfg.get("evaluators") or {}).get("mia") or {}).get("params") or {}).get("primary")
    for fpr, txt in (("0.01", "1%"), ("0.001", "0.1%")):
        m = metrics.get(f"mia.pooled.{primary}.tpr_at_fpr.{fpr}") if primary else None
        if isinstance(m, dict):
            print(f"{'membership: TPR @ ' + txt + ' FPR':<{width}}  {_fmt(m)}  ({primary}, pooled)")
    t = rec.get("timings", {})
    print(f"{'time (train / total)':<{width}}  {t.get('train', 0):.1f} s / {t.get('total', 0):.1f} s")
    for w in rec.get("warnings", []):
        print(f"warning: {w}")
    for f in rec.get("flags") or []:  # named sanity flags: the robustness number is not to be trusted
        print(f"FLAG {f.get('name')} ({', '.join(f.get('evaluators') or [])}): {f.get('message')}")
    print("-" * (width + 40))
    print(f"record   {run_dir / 'record.json'}")
    if rec.get("report"):
        print(f"report   {rec['report']}")


#: below this many parameters a CPU run uses one torch thread unless --threads says otherwise
SMALL_MODEL_PARAMS = 1_000_000


def auto_threads(cfg) -> int | None:
    """Default intra-op thread count of a run: 1 for a CPU run of a small model (cnn8, cnn28,
    gap-cnn: < 1M parameters), whose convolutions are too small to gain from several threads
    and lose badly when the cores are shared (one cnn8 training step took 8 ms with one thread
    and 790 ms with two on the loaded 2-core development machine); None (torch's choice, one
    thread per core) otherwise.  ``--threads N`` overrides it; the record's
    ``versions.torch_threads`` says what was used."""
    if cfg.device != "cpu":
        return None
    from . import params as P
    from .models import build_model, count_parameters

    shape, num_classes = tuple(cfg.dataset_info["shape"]), cfg.dataset_info["num_classes"]
    c = shape[0]
    try:
        model = build_model(cfg.model, shape, num_classes, (0.5,) * c, (0.5,) * c, P.to_dict(cfg.model_params))
    except Exception:  # noqa: BLE001 - a model that cannot be built fails later with its own message
        return None
    return 1 if count_parameters(model) < SMALL_MODEL_PARAMS else None


def cmd_run(args) -> int:
    from .config import make_config, parse_sets
    from .runner import execute

    if args.threads < 0:
        raise UsageError(f"--threads {args.threads} is not valid: give a positive number of threads, "
                         "or 0 for the default.")
    evaluators = None
    if args.evaluators is not None:
        evaluators = [e.strip() for e in args.evaluators.split(",")]
        if not all(evaluators):
            from .registry import registry

            raise UsageError(f"--evaluators {args.evaluators!r} has an empty name. Valid choices: "
                             + ", ".join(registry("evaluator").names()) + " (comma-separated).")
    cfg = make_config(dataset=args.dataset, defense=args.defense, model=args.model, seed=args.seed,
                      sets=parse_sets(args.set), evaluators=evaluators, device=args.device,
                      data_dir=args.data_dir, download=args.download, deterministic=args.deterministic)
    progress = not args.quiet
    threads = args.threads or auto_threads(cfg)
    if threads:
        import torch
        torch.set_num_threads(threads)
    from .execution.executors import make_executor

    # workers of a pool train small models with one thread each (what makes N processes use N cores)
    executor = make_executor(args.executor, workers=args.workers, address=args.address, progress=progress,
                             threads=threads or 1, train_mode=getattr(args, "train_mode", None))
    try:
        outcome = execute(cfg, args.out, force=args.force, progress=progress,
                          log=(lambda *a: print(*a, file=sys.stderr)), executor=executor)
    except UsageError:
        raise
    except CfbenchError as e:
        from .runner import attempt_dir

        print(f"cfbench: run failed: {e}\n  record: {attempt_dir(args.out, cfg.run_id(), args.force) / 'record.json'}",
              file=sys.stderr)
        return 1
    finally:
        executor.close()
    print_summary(outcome.record, outcome.run_dir, outcome.reused)
    from .present.report import report_after_run  # <run-dir>/report.html; a failure only warns

    report_after_run(outcome.run_dir)
    return 0


def cmd_sweep(args) -> int:
    from .sweep import sweep

    if args.list_state:
        from .sweep import unfinished_state

        for path in unfinished_state(args.grid, args.out):
            print(path)
        return 0
    rows = sweep(args.grid, out=args.out, executor=args.executor, workers=args.workers, address=args.address,
                 leaderboards=args.leaderboards, dry_run=args.dry_run)
    return 0 if all(r["status"] == "ok" for _, r in rows) else 1


def _print_dataset_defaults(name: str) -> None:
    from .registry import get

    try:
        spec = get("dataset", name)
    except Exception:  # noqa: BLE001 - a broken plugin is reported by the listing itself
        return
    recipe = (f"model {spec.default_model}, eps {spec.default_eps:g} (Linf) / {spec.default_eps_l2:g} (L2), "
              f"{spec.default_epochs} epochs, batch {spec.default_batch_size}, lr {spec.default_lr:g}")
    print(f"      defaults: {recipe}")
    extra = getattr(spec, "default_evaluator_settings", {})
    if extra:
        print("      evaluator defaults: " + ", ".join(f"{k}={v!r}" for k, v in extra.items()))
    for defense, values in (getattr(spec, "default_defense_settings", {}) or {}).items():
        print(f"      {defense} defaults (literature): " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                                                                    f"{k}={v!r}" for k, v in values.items()))


def cmd_list(args) -> int:
    from .registry import KINDS, LOAD_WARNINGS, PluginWarning, list_components

    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        if kind not in KINDS:
            raise UsageError(f"unknown component kind {kind!r}. Valid choices: {', '.join(KINDS)}.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)  # collected in LOAD_WARNINGS, printed once below
            rows = list_components(kind)
        print(f"{kind}s:")
        for r in rows:
            src = "" if r["source"].startswith("cfbench ") else f"  [{r['source']}]"
            print(f"  {r['name']:<16} {r['description']}{src}")
            if r.get("error"):
                print(f"      ERROR: {r['error']}")
            for p in r["params"]:
                print(f"      {p['name']} = {p['default']!r}  ({p['type']}) {p['help']}")
            if kind == "dataset" and not r.get("error"):
                _print_dataset_defaults(r["name"])
        print()
    if not args.kind:
        from .config import BASE_SECTIONS
        from .params import describe

        print("run settings (--set section.key=value, or key=value when unambiguous):")
        for sec, cls in BASE_SECTIONS.items():
            for p in describe(cls):
                print(f"  {sec}.{p['name']} = {p['default']!r}  ({p['type']}) {p['help']}")
    for w in LOAD_WARNINGS:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def add_executor_options(p: argparse.ArgumentParser, *, what: str, train_mode: bool = False) -> None:
    p.add_argument("--executor", default="local", metavar="{local,ray}",
                   help=f"who runs {what}: local (a process pool on this machine; default) or ray")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local: worker processes (default: the machine's cores); ray: CPUs of a new local Ray instance")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="ray: the address of an existing Ray cluster (default: start a local one)")
    if train_mode:   # `cfbench run` only: a sweep runs one process per run
        p.add_argument("--train-mode", default=None, metavar="{serial,batched,auto}",
                       help="local: how declared jobs (reference models) train: serial (default; bit-identical "
                            "whichever executor), batched (members of one small-model recipe as one stacked "
                            "network, equal within a stated tolerance) or auto (batched where supported); "
                            "CFBENCH_TRAIN_MODE sets the default")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="cfbench",
        description="Benchmark the accuracy / adversarial robustness / membership privacy trade-off "
                    "of image classifiers under one harness.")
    p.add_argument("--version", action="version", version=f"cfbench {__version__}")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                   help="load components from a local Python file (repeatable)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="train and evaluate one defense",
                       description="Train one defense on one dataset and evaluate it; writes OUT/<run-id>/record.json.")
    r.add_argument("--defense", default="erm", help="defense name (see `cfbench list defense`); default erm")
    r.add_argument("--dataset", default="digits", help="dataset name; default digits (bundled)")
    r.add_argument("--model", default=None, help="model name; default: the dataset's default model")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; default cpu")
    r.add_argument("--seed", type=int, default=0, help="training seed; default 0")
    r.add_argument("--out", default="runs", help="directory of run folders; default runs/")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="typed hyper-parameter of the defense, training, threat model, data or an evaluator, "
                        "e.g. --set eps=0.1 --set epochs=20 --set defense.steps=10 (repeatable; a bare key must be unambiguous)")
    r.add_argument("--evaluators", default=None,
                   help="comma-separated evaluators; default clean,pgd,autoattack,mia")
    r.add_argument("--data-dir", default=None, help="directory with dataset files (IDX, cifar-10-batches-py)")
    r.add_argument("--download", action="store_true", help="download the dataset through torchvision if installed")
    r.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (and cuDNN deterministic kernels): bit-reproducible "
                        "CUDA runs, slower; recorded in the record, not part of the run id")
    r.add_argument("--force", action="store_true", help="recompute even if a finished run with this config exists")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch intra-op CPU threads (default: 1 for models under 1M parameters on CPU, "
                        "torch's choice otherwise)")
    add_executor_options(r, what="the training jobs a run declares (membership reference models, DeMem's oracle)",
                         train_mode=True)
    r.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="a grid of runs (TOML), locally or on Ray, then its leaderboards",
                        description="Run every point of a grid file (see cfbench.sweep): finished runs are "
                                    "skipped by config hash; a summary table and the leaderboards at the end.")
    sw.add_argument("grid", nargs="+",
                    help="the grid file (TOML); several run one after the other in one pool of workers "
                         "(a free worker helps an earlier file's running run before a later file's run starts)")
    sw.add_argument("--out", default="runs", help="directory of run folders; default runs/")
    sw.add_argument("--leaderboards", default=None, help="where the leaderboards go (default OUT/leaderboards)")
    sw.add_argument("--dry-run", action="store_true", help="list the runs that would start, start none")
    sw.add_argument("--list-state", action="store_true",
                    help="print the files that hold the unfinished runs' progress (started runs' folders; "
                         "the reference models and their checkpoints of every unfinished run, started or not; "
                         "no locks), one per line, start nothing: "
                         "commit them (git add -f) to resume the sweep from a clean clone")
    add_executor_options(sw, what="the runs (one process or Ray task per run)")
    sw.set_defaults(func=cmd_sweep)

    ls = sub.add_parser("list", help="registered defenses, datasets, models, attacks and evaluators")
    ls.add_argument("kind", nargs="?", help="only this kind: defense, dataset, model, attack, evaluator")
    ls.set_defaults(func=cmd_list)
    for sp in (r, sw, ls):  # `cfbench run --plugin f.py ...` works as well as `cfbench --plugin f.py run ...`
        sp.add_argument("--plugin", dest="plugin_here", action="append", default=[], metavar="FILE.py",
                        help="load components from a local Python file (repeatable)")

    for extra in _extra_commands():
        extra(sub)
    return p


def _extra_commands():
    """Sub-commands that live in their own modules (``leaderboard``, ``report``, ``doctor``, ``ddpm``)."""
    from .diffusion import add_subparser as add_ddpm
    from .doctor import add_subparser as add_doctor
    from .present.cli import add_subparsers

    return [add_subparsers, add_doctor, add_ddpm]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    warnings.simplefilter("default")
    try:
        from .registry import load_plugin_file

        for path in args.plugin + getattr(args, "plugin_here", []):
            load_plugin_file(path)
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away (`| head`) shows up here, not at exit
        return code
    except BrokenPipeError as e:
        if _stdout_closed():
            return _closed_pipe()
        print(f"cfbench: error: {_os_error_text(e)}", file=sys.stderr)
        return 1
    except (UsageError, PluginError) as e:
        print(f"cfbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cfbench: interrupted; run the same command again to resume from the last checkpoint.", file=sys.stderr)
        return 130
    except OSError as e:  # the environment: full disk, read-only file system, no permission, ...
        print(f"cfbench: error: {_os_error_text(e)}", file=sys.stderr)
        return 1


def _stdout_closed() -> bool:
    """True if stdout is a pipe whose reader has gone (not some other broken pipe)."""
    try:
        import select

        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _closed_pipe() -> int:
    """The reader of stdout went away (``cfbench list | head -1``): stop quietly, as a process
    killed by SIGPIPE would (status 141), without Python's traceback or its flush warning."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def _os_error_text(e: OSError) -> str:
    """``<what failed>: <path>`` and, for the usual environment errors, what to do."""
    import errno

    what = e.strerror or str(e)
    where = f": {e.filename}" if e.filename else ""
    hint = {errno.ENOSPC: "free some space and run the same command again (finished work is kept, "
                          "an interrupted run resumes)",
            errno.EDQUOT: "free some space and run the same command again",
            errno.EROFS: "the file system is read-only; give a writable directory (e.g. --out DIR)",
            errno.EACCES: "no permission to write there; give a directory you can write to (e.g. --out DIR)",
            errno.EPERM: "no permission to write there; give a directory you can write to (e.g. --out DIR)",
            }.get(e.errno)
    return f"{what}{where}" + (f"; {hint}" if hint else "")


if __name__ == "__main__":
    sys.exit(main())
