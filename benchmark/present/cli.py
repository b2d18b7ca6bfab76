"""The ``cfbench leaderboard`` and ``cfbench report`` sub-commands.

:func:`add_subparsers` adds both to the main parser of :mod:`cfbench.cli`; the work is done
by :mod:`.leaderboard` / :mod:`.writers` (tables) and :mod:`.report` (HTML reports).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import UsageError
from ..store import RECORD
from .html import write_html
from .leaderboard import build, command_for
from .writers import to_markdown, write_tables


# ---------------------------------------------------------------------------- leaderboard
def _defenses(arg: str | None) -> list[str] | None:
    if arg is None:
        return None
    names = [d.strip() for d in arg.split(",")]
    if not all(names):
        raise UsageError(f"--defense {arg!r} has an empty name; give comma-separated defense names, e.g. "
                         "--defense erm,pgd-at.")
    return sorted(set(names))


def cmd_leaderboard(args) -> int:
    defenses = _defenses(args.defense)
    boards = build(args.runs, args.dataset, runs_label=args.runs, include_flagged=args.include_flagged,
                   defenses=defenses)
    unusable = boards[0].unusable if boards else []
    if unusable:  # the same files are listed in every table: warn once
        print(f"warning: {len(unusable)} record file{'s' if len(unusable) != 1 else ''} under {args.runs} could "
              "not be used and were left out (listed in each table's notes):", file=sys.stderr)
        for e in unusable:
            print(f"  {e['path']}: {e['reason']}", file=sys.stderr)
    for lb in boards:
        lb.command = command_for(lb.dataset, args.runs, args.out, include_flagged=args.include_flagged,
                                 defenses=defenses)
    if not args.no_reports:  # every row links to its runs' reports: (re)write them first
        from .report import write_run_reports

        write_run_reports(boards)
    all_paths, _ = write_tables(boards, args.out, runs=args.runs, dataset=args.dataset, defenses=defenses,
                                force=args.force)
    for lb, paths in zip(boards, all_paths):
        if not args.quiet:
            print(to_markdown(lb))
        failed = len(lb.excluded) - len(lb.unusable)
        print(f"wrote {paths['md']} (.csv .json .html .tex): {len(lb.rows)} rows from {len(lb.records)} runs"
              + (f"; {failed} failed/unfinished excluded" if failed else "")
              + (f"; {len(lb.unusable)} unusable record files left out" if lb.unusable else ""))
    return 0


# --------------------------------------------------------------------------------- report
def _resolve_run(arg: str, runs: str | None) -> Path:
    p = Path(arg)
    if (p / RECORD).exists():
        return p
    if runs is not None and (Path(runs) / arg / RECORD).exists():
        return Path(runs) / arg
    if (Path("runs") / arg / RECORD).exists():
        return Path("runs") / arg
    raise UsageError(f"{arg!r} is neither a run directory (with record.json) nor a run id under "
                     f"{runs or 'runs'!r}; pass the run's directory, e.g. runs/<run-id>.")


def cmd_report(args) -> int:
    # imported here: matplotlib loads only when a report is written, not for every command
    from .report import leaderboard_report, resolve_leaderboard, run_report

    if bool(args.run) == bool(args.leaderboard):
        raise UsageError("give either a run (directory or id) or --leaderboard NAME, not "
                         + ("both." if args.run else "neither."))
    if args.leaderboard:
        parts = ["cfbench", "report", "--leaderboard", args.leaderboard]
        if args.leaderboards != "leaderboards":
            parts += ["--leaderboards", args.leaderboards]
        if args.out:
            parts += ["--out", args.out]
        path = resolve_leaderboard(args.leaderboard, args.leaderboards)
        # the table's whole name: names such as digits-cnn8-Linf-0.1-<hash> contain dots
        out = Path(args.out) if args.out else Path("reports") / f"leaderboard-{path.name[:-len('.json')]}.html"
        html = leaderboard_report(str(path), leaderboards=args.leaderboards,
                                  command=" ".join(shlex.quote(p) for p in parts), strict=args.strict,
                                  warn=lambda m: print(f"warning: {m}", file=sys.stderr), out_dir=out.parent)
    else:
        run_dir = _resolve_run(args.run, args.runs)
        parts = ["cfbench", "report", str(run_dir)]
        if args.runs:
            parts += ["--runs", args.runs]
        if args.out:
            parts += ["--out", args.out]
        html = run_report(run_dir, runs=args.runs, command=" ".join(shlex.quote(p) for p in parts))
        out = Path(args.out) if args.out else Path("reports") / f"{run_dir.resolve().name}.html"
    path = write_html(html, out)
    print(f"report   {path}")
    return 0


# ------------------------------------------------------------------------------- parsers
def cmd_compare(args) -> int:
    from ..store.io import write_json
    from .compare import compare, render

    result = compare(args.runs_to_compare, runs=args.runs, attack=args.attack)
    print(render(result))
    if args.json:
        write_json(Path(args.json), result)
    return 0


def add_subparsers(subparsers) -> None:
    """Add the ``leaderboard`` and ``report`` sub-commands to ``subparsers``."""
    p = subparsers.add_parser(
        "leaderboard", help="aggregate stored records into leaderboard tables",
        description="Aggregate the finished records under --runs that share a protocol (dataset, model, threat "
                    "model, data split, evaluators) into tables: <out>/<name>.{md,csv,json,html,tex}, <name> = "
                    "<dataset>-<model>-<norm>-<eps>-<8 hex digits of the protocol id>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=None, help="only records of this dataset (default: every dataset)")
    p.add_argument("--runs", default="runs", help="directory of run folders (as written by `cfbench run --out`)")
    p.add_argument("--out", default="leaderboards", help="directory the tables are written to")
    p.add_argument("--quiet", action="store_true", help="do not print the tables, only the paths")
    p.add_argument("--include-flagged", action="store_true",
                   help="rank rows with robustness sanity flags on the Pareto front too (they stay marked); "
                        "by default a flagged row is kept off the ranking")
    p.add_argument("--defense", default=None, metavar="A,B",
                   help="only rows of these defenses (comma-separated); the tables are named ...-only-A+B "
                        "(default: every defense)")
    p.add_argument("--force", action="store_true",
                   help="overwrite table files of the same name that hold another protocol or come from another "
                        "runs folder (refused by default)")
    p.add_argument("--no-reports", action="store_true",
                   help="do not (re)write <run-dir>/report.html of the tabulated runs (the HTML table links to them)")
    p.set_defaults(func=cmd_leaderboard)

    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a run or a leaderboard",
        description="Write one self-contained HTML file (figures embedded, no network access needed) for a run "
                    "or for a leaderboard built by `cfbench leaderboard`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", nargs="?", default=None, help="run directory (with record.json) or run id")
    p.add_argument("--leaderboard", default=None, metavar="NAME",
                   help="report on leaderboard NAME (a file stem in --leaderboards, its name without the protocol hash "
                        "when only one protocol has it, or a path to its .json)")
    p.add_argument("--leaderboards", default="leaderboards", help="directory of leaderboards")
    p.add_argument("--strict", action="store_true",
                   help="refuse (exit 2) to render a leaderboard whose runs have changed since it was built "
                        "(default: render it with a warning banner)")
    p.add_argument("--runs", default=None,
                   help="directory of run folders: where a run id is looked up and where the runs compared with "
                        "this one are found (default: the run directory's parent)")
    p.add_argument("--out", default=None,
                   help="output file (default: reports/<run-id>.html or reports/leaderboard-<name>.html)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser(
        "compare", help="differences between runs with paired intervals",
        description="Compare runs with the first one: clean and robust accuracy (paired bootstrap over the same "
                    "test examples), membership leakage (AUC and TPR at the lowest supportable FPR of one attack, "
                    "paired over the same pool), and over seeds when an argument lists several runs (a,b,c).")
    p.add_argument("runs_to_compare", nargs="+", metavar="RUN", help="run folder or id; a,b,c = one recipe's seeds")
    p.add_argument("--runs", default=None, help="directory where run ids are looked up")
    p.add_argument("--attack", default=None, help="the membership attack to compare (default: the protocol's primary)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the comparison as JSON")
    p.set_defaults(func=cmd_compare)
