"""``homoflow``: simulate gradient descent or gradient flow on a homogeneous model, sweep
grids of configurations, run the paper's experiments.

The options come from one schema (``homoflow.configs``) shared with sweeps and TOML files.
Every option is checked, and ``--out`` prepared, before any set-up; JAX is imported only
once a command runs (``--help`` stays fast). SIGINT / SIGTERM stop a command at the next
safe point: everything recorded is written with status "interrupted" and the exit code is
130 (``homoflow run --resume DIR`` continues a descent run). Compiled programs are kept
in JAX's persistent compilation cache (``--no-compile-cache`` or
HOMOFLOW_NO_COMPILE_CACHE=1 to opt out; HOMOFLOW_CACHE_DIR to move it).
"""

from __future__ import annotations

import argparse
import math
import datetime as _dt
import os
import sys
from pathlib import Path

from . import __version__, configs, io

EXIT_INTERRUPTED = 130
EXIT_STOPPED = 2        # a run that stopped early (diverged, stalled, ...) or bad input

RUN_FILES = ("trajectory.csv", "columns.npz", "snapshots.npz", "meta.json", "summary.json")


def _setup_jax(no_cache: bool = False):
    """Import JAX, switch on float64 (homoflow's science lives at losses of 1e-800) and the
    persistent compilation cache; returns the jax module."""
    import jax

    jax.config.update("jax_enable_x64", True)
    if not (no_cache or os.environ.get("HOMOFLOW_NO_COMPILE_CACHE", "") not in ("", "0")):
        cache = os.environ.get("HOMOFLOW_CACHE_DIR") or str(
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "homoflow" / "jax")
        try:
            Path(cache).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"homoflow: no compilation cache ({cache}: {e.strerror})", file=sys.stderr)
        else:
            jax.config.update("jax_compilation_cache_dir", cache)
            # every program: a run is dozens of small compilations (0.1-2 s each)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax


def _default_out(prefix: str) -> Path:
    return Path("runs") / _dt.datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S-%f")


def _fail(parser, message: str):
    parser.error(message)   # exits 2 with the usage line


# ---------------------------------------------------------------------------------------
# homoflow run


def _add_schema_options(p, names, *, sweep: bool = False):
    """One option per schema key; defaults stay in the schema (the attribute is absent
    unless given, so --config files and --resume can tell what was set)."""
    base = configs.defaults(sweep)
    for name in names:
        o = configs.OPTIONS[name]
        default = base.get(name, o.default)
        shown = "" if default is None else f" (default: {default:g})" if isinstance(
            default, float) else f" (default: {default})"
        kw = dict(dest=name, default=argparse.SUPPRESS, help=o.help + shown)
        if sweep:
            kw.update(nargs="+", metavar=name.upper())
        else:
            kw["metavar"] = "{" + ",".join(o.choices) + "}" if o.choices else name.upper()
        p.add_argument(o.flag, type=str, **kw)


def _summary_table(summary: dict) -> str:
    rows = [("status", summary["status"]),
            ("iterations" if summary["engine"] != "flow" else "solver steps", summary["steps"]),
            ("t0 (first L < l(b_f))", summary["t0_step"] if summary["engine"] != "flow"
             else f"t = {summary['t0_time']:.6g}" if summary["t0_time"] is not None else None),
            ("log T", f"{summary['log_T']:.6g}"),
            ("log10 L", f"{summary['log10_loss']:.6g}"),
            ("rho = ||theta||", f"{summary['rho']:.6g}")]
    if summary["separated"]:
        rows += [("normalized margin gamma_bar", f"{summary['normalized_margin']:.10g}"),
                 ("smoothed margin gamma_tilde", f"{summary['smoothed_margin']:.10g}"),
                 ("descent margin gamma_hat", f"{summary['descent_margin']:.10g}"),
                 ("1 - beta", f"{summary['one_minus_beta']:.4g}"),
                 ("near-support points", summary["n_support"]),
                 ("gamma_tilde decreases after t0", summary["smoothed_margin_decreases"]),
                 ("gamma_hat decreases after t0", summary["descent_margin_decreases"])]
    else:
        rows.append(("margins", "not separated: no margin claims"))
    if summary.get("wall_time_s") is not None:
        rows.append(("wall time (s)", f"{summary['wall_time_s']:.2f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _run_config(args, parser) -> tuple[dict, Path, object]:
    """The resolved configuration, the prepared run directory and (with --resume) the
    interrupted trajectory; every check before any compute."""
    given = {k: getattr(args, k) for k in configs.OPTIONS if hasattr(args, k)}
    if args.resume:
        if given or args.config or args.out or args.overwrite:
            _fail(parser, f"--resume {args.resume} continues that run with its own "
                          f"configuration; drop {', '.join(configs.OPTIONS[k].flag for k in given) or '--config/--out/--overwrite'}")
        from .trajectory import Trajectory

        d = Path(args.resume)
        if not d.is_dir():
            _fail(parser, f"--resume {d}: no such directory")
        traj = Trajectory.load(d)
        if traj.status != "interrupted":
            _fail(parser, f"--resume {d}: the run's status is {traj.status!r}; only an "
                          f"interrupted run can be resumed")
        if traj.meta["engine"] != "descent" or traj.state is None:
            _fail(parser, f"--resume {d}: only descent runs can be resumed (a flow run's "
                          f"adaptive solver state is not saved); rerun it with --overwrite")
        return configs.resolve(traj.meta["config"]), io.prepare_out(d, resume=True), traj
    raw = {}
    if args.config:
        raw.update(configs.read_toml(args.config))
    raw.update(given)
    try:
        config = configs.resolve(raw, given=set(raw))
    except ValueError as e:
        _fail(parser, f"{args.config + ': ' if args.config and not given else ''}{e}")
    if config["engine"] != "flow":
        flags = [f for f, v in (("--budget", args.budget), ("--rtol", args.rtol),
                                ("--atol", args.atol)) if v is not None]
        if flags:
            _fail(parser, f"{', '.join(flags)}: only with --engine flow (got --engine "
                          f"{config['engine']})")
    out = io.prepare_out(args.out or _default_out("run"), overwrite=args.overwrite)
    return config, out, None


def _run(args, parser) -> int:
    config, out, previous = _run_config(args, parser)
    # from here on a signal is a request to stop and save (set-up included)
    with io.Interrupt() as stop:
        return _run_in(args, config, out, previous, stop)


def _run_in(args, config, out, previous, stop) -> int:
    jax = _setup_jax(args.no_compile_cache)
    from . import kkt, losses
    from .descent import RunStopped, descent
    from .problem import make_problem

    X, y = configs.load_data(config)
    model = configs.build_model(config)
    problem = make_problem(model, losses.get_loss(config["loss"]), X, y)
    params0 = model.init(jax.random.PRNGKey(config["seed"]), scale=config["init_scale"])
    constants = None
    if config["policy"] == "h_bound" and config["c_eta"] == "estimate":
        from .schedules import estimate_smoothness_constants
        est = estimate_smoothness_constants(problem, jax.random.PRNGKey(0))
        constants = (est["B0"], est["B1"], est["B2"])
    policy = configs.build_policy(config, constants) if config["engine"] == "descent" else None
    how = (f"gradient flow to log t = {config['log_t_max']:g}" if config["engine"] == "flow"
           else f"{policy.name} steps, {config['steps']} iterations")
    data = Path(config["data_file"]).name if config["data_file"] else config["data"]
    print(f"homoflow run: {model.name} (L = {model.order:g}, "
          f"{len(jax.tree_util.tree_leaves(params0))} weight arrays) on {data} data "
          f"(N = {config['n']}, d = {config['dim']}), {config['loss']} loss, {how}"
          + (f"; resuming at iteration {int(previous['step'][-1])}" if previous else ""),
          flush=True)
    if not args.no_progress:
        print("compiling…" + ("" if args.no_compile_cache else
                              " (kept in the compilation cache for the next run)"),
              file=sys.stderr, flush=True)
    code = 0
    try:
        if config["engine"] == "flow":
            from .flow import flow  # diffrax & co.: imported only when the flow runs
            traj = flow(problem, params0, log_t_max=config["log_t_max"],
                        n_saves=config["n_saves"], h_max=config["h_max"],
                        max_steps=config["max_steps"], progress=not args.no_progress,
                        config=config, on_record=stop, max_wall_s=args.budget,
                        **_flow_tolerances(args))
        else:
            traj = descent(problem, params0, policy, config["steps"],
                           batch_size=config["batch_size"],
                           key=jax.random.PRNGKey(config["seed"]),
                           n_records=config["n_records"], chunk=config["chunk"],
                           divergence_factor=config["divergence_factor"],
                           t0_log_loss=config["t0_log_loss"],
                           progress=not args.no_progress, config=config,
                           margin_norm=config["margin_norm"], on_record=stop,
                           resume=previous)
    except RunStopped as err:
        traj, code = err.trajectory, EXIT_STOPPED
        print(f"stopped: {err}", file=sys.stderr)
    traj.meta["seed"] = config["seed"]
    if stop.requested:
        at = int(traj["step"][-1])
        traj.meta.update(status="interrupted", interrupted_by=stop.name,
                         message=f"interrupted by {stop.name} at "
                                 f"{'iteration' if config['engine'] == 'descent' else 'solver step'}"
                                 f" {at}; every recorded point is saved"
                                 + (f"; continue with: homoflow run --resume {out}"
                                    if traj.state is not None else ""))
        traj.meta.pop("stopped_by_hook", None)
        code = EXIT_INTERRUPTED
    elif code == 0:
        traj.state = None    # a finished run has nothing to resume
    traj.save(out)
    summary = traj.summary()
    print(_summary_table(summary))
    if summary["status"] in ("not_separated", "interrupted"):
        print(f"note: {summary['message']}")
    files = ", ".join(RUN_FILES) + ", summary.png"
    report = None
    if code != EXIT_INTERRUPTED and not args.no_kkt_report and \
            summary["status"] != "not_separated":
        try:
            report = kkt.convergence_report(problem, traj)
        except ValueError as err:  # e.g. no saved point after separation
            print(f"no convergence report: {err}")
        else:
            print("\nconvergence to a KKT point of (P) (last decades of log T):")
            print(kkt.format_report(report))
            io.write_text(out / "convergence.md", kkt.format_report(report, max_rows=50) + "\n")
            kkt.plot_report(report, out / "convergence.png")
            files += ", convergence.md, convergence.png"
    from .plots import save_summary  # matplotlib: imported after the first result
    save_summary(traj, out, report)   # the one-page dashboard, with the polished margin
    print(f"run directory: {out}  ({files})")
    return code


def _flow_tolerances(args) -> dict:
    """--rtol / --atol for both of the flow's phases (flow()'s own defaults where absent)."""
    return {k: v for k, v in (("rtol", args.rtol), ("polar_rtol", args.rtol),
                              ("atol", args.atol), ("polar_atol", args.atol)) if v is not None}


def _flow_positive(flag: str, below_one: bool = False):
    """argparse type for the flow's numeric flags: a finite number > 0 (and < 1)."""
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}")
        if not (math.isfinite(v) and v > 0 and (v < 1 or not below_one)):
            raise argparse.ArgumentTypeError(
                f"{flag} must be finite and > 0{' and < 1' if below_one else ''}, got {text}")
        return v
    return parse


def _add_run_parser(sub):
    run = sub.add_parser(
        "run", help="run gradient descent (or gradient flow) on a homogeneous model",
        description="Run gradient descent and record margins. The default problem: a "
                    "bias-free two-layer ReLU network of width 100 on 100 linearly separable "
                    "Gaussian points in 10 dimensions, exponential loss, the loss-based "
                    "step-size scheduler of Appendix K.1, 10^4 iterations. Options may also "
                    "come from a TOML file (--config; keys as the options, with "
                    "underscores); options on the command line override it. Ctrl-C stops "
                    "at the next recorded point and saves everything (status "
                    "'interrupted', exit 130); --resume DIR continues a descent run bit for "
                    "bit.")
    run.add_argument("--config", default=None, metavar="FILE",
                     help="TOML file of options (e.g. model = \"deep_linear\"\\ndepth = 3)")
    _add_schema_options(run, [k for k in configs.OPTIONS])
    run.add_argument("--budget", type=_flow_positive("--budget"), default=None,
                     metavar="SECONDS", help="flow: wall-clock budget for the solve "
                     "(compilation excluded); the run ends early with status wall_budget")
    run.add_argument("--rtol", type=_flow_positive("--rtol", below_one=True), default=None,
                     help="flow: relative tolerance of both phases' solvers (default: "
                          "flow()'s, 1e-6)")
    run.add_argument("--atol", type=_flow_positive("--atol", below_one=True), default=None,
                     help="flow: absolute tolerance of both phases' solvers (default: "
                          "flow()'s, 1e-9 in phase 1 and 1e-6 on the unit sphere in phase 2)")
    run.add_argument("--out", default=None,
                     help="run directory (default: a fresh directory under runs/); an "
                          "existing non-empty one needs --overwrite")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in --out (its files are deleted first)")
    run.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the interrupted descent run in DIR with its own "
                          "configuration; the result equals an uninterrupted run bit for bit")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--no-kkt-report", action="store_true",
                     help="skip the closing convergence report (KKT residuals, polished point)")
    run.add_argument("--no-compile-cache", action="store_true",
                     help="do not use JAX's persistent compilation cache (also: "
                          "HOMOFLOW_NO_COMPILE_CACHE=1)")
    run.set_defaults(func=_run, parser=run)
    return run


# ---------------------------------------------------------------------------------------
# homoflow sweep


def _add_sweep_parser(sub):
    sw = sub.add_parser(
        "sweep", help="run a grid of configurations (vmapped, sharded over all devices)",
        description="Run every configuration of a grid and write one tidy table "
                    "(table.npz, table.csv, sweep.json) to --out. The grid comes from a TOML "
                    "file (--grid; keys as the options below, a list is an axis) and from "
                    "the options, which override it; each option takes one or more values. "
                    "Step sizes, policy parameters and seeds are vmapped; depth, width, "
                    "model and loss loop over compiled programs. Started again with the "
                    "same --out and --resume, an interrupted sweep computes only what is "
                    "missing (Ctrl-C stops after the batch in progress, exit 130).")
    sw.add_argument("--grid", default=None, help="TOML file with the grid")
    _add_schema_options(sw, configs.SWEEP_KEYS, sweep=True)
    sw.add_argument("--out", default=None,
                    help="output directory (default: a fresh directory under runs/)")
    sw.add_argument("--resume", action="store_true",
                    help="--out holds this sweep, interrupted: compute only what is missing")
    sw.add_argument("--overwrite", action="store_true",
                    help="replace the sweep in --out (its files are deleted first)")
    sw.add_argument("--max-batch", type=int, default=4096,
                    help="at most this many configurations per compiled call")
    sw.add_argument("--devices", type=int, default=None,
                    help="use the first N devices (default: all)")
    sw.add_argument("--distributed", action="store_true",
                    help="multi-process: jax.distributed via sweep.initialize_distributed "
                         "(a managed cluster is detected; elsewhere set "
                         "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, "
                         "JAX_PROCESS_ID); process 0 writes")
    sw.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sw.add_argument("--no-compile-cache", action="store_true",
                    help="do not use JAX's persistent compilation cache")
    sw.set_defaults(func=_sweep, parser=sw)
    return sw


def _add_report_parser(sub):
    from .report import add_parser

    rep = add_parser(sub)   # homoflow report DIR... (homoflow/report.py)
    rep.set_defaults(func=_report, parser=rep)
    return rep


def _report(args, parser) -> int:
    _setup_jax(getattr(args, "no_compile_cache", False))
    from .report import main as report_main

    return report_main(args)


def _sweep(args, parser) -> int:
    grid = {}
    if args.grid:
        grid.update(configs.read_toml(args.grid))
    for name in configs.SWEEP_KEYS:
        if hasattr(args, name):
            values = getattr(args, name)
            grid[name] = values if len(values) > 1 else values[0]
    for name, values in grid.items():   # each value checked before JAX is imported
        if name not in configs.SWEEP_KEYS:
            _fail(parser, f"{args.grid}: unknown grid key {name!r}; known: "
                          f"{', '.join(configs.SWEEP_KEYS)}")
        for v in values if isinstance(values, list) else [values]:
            try:
                configs.check_value(name, v)
            except ValueError as e:
                _fail(parser, f"{args.grid + ': ' if args.grid else ''}{e}")
    if args.max_batch < 1:
        _fail(parser, f"--max-batch must be >= 1, got {args.max_batch}")
    if args.devices is not None and args.devices < 1:
        _fail(parser, f"--devices must be >= 1, got {args.devices}")
    from . import sweep as sweep_mod   # imports JAX

    try:
        n_configs = len(sweep_mod.expand(grid))   # every configuration checked first
    except ValueError as e:
        _fail(parser, f"{args.grid + ': ' if args.grid else ''}{e}")
    if args.distributed:   # every process checks its own share; process 0 owns --out
        if not args.out:
            _fail(parser, "--distributed needs --out (one directory for every process)")
        jax = _setup_jax(args.no_compile_cache)
        sweep_mod.initialize_distributed()
        out = Path(args.out)
        if jax.process_index() == 0:
            io.prepare_out(out, resume=args.resume, overwrite=args.overwrite, what="sweep")
    else:
        out = io.prepare_out(args.out or _default_out("sweep"), resume=args.resume,
                             overwrite=args.overwrite, what="sweep")
        jax = _setup_jax(args.no_compile_cache)
    devices = None if args.devices is None else jax.devices()[: args.devices]
    with io.Interrupt("stopping after the batch in progress and saving every finished "
                      "configuration; send it again to stop at once (the batch is lost)") \
            as stop:
        print(f"homoflow sweep: {n_configs} configurations into {out}", flush=True)
        table = sweep_mod.sweep(grid, out=out, devices=devices, max_batch=args.max_batch,
                                progress=not args.no_progress, should_stop=stop)
    from .report import status_table

    m = table.meta
    print(f"{m['n_configs']} configurations ({len(m['computed'])} computed, "
          f"{len(m['reused'])} reused) on {m['devices']} device(s), {len(table)} rows in "
          f"{m['wall_time_s']:.1f} s")
    print(status_table(table, max_rows=40))   # one row per configuration (all: status.md)
    for status in sorted(set(m["statuses"])):
        print(f"  {status}: {m['statuses'].count(status)}")
    print(f"sweep directory: {out}  (table.npz, table.csv, sweep.json, manifest.json, configs/, "
          f"status.md, rates.png)")
    if stop.requested:
        print(f"interrupted by {stop.name}: {len(m['missing'])} configurations not computed; "
              f"continue with the same options and --out {out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


# ---------------------------------------------------------------------------------------
# homoflow experiment


def _add_experiment_parser(sub):
    ex = sub.add_parser(
        "experiment", help="run one of the paper's experiments",
        description="paper-cnn: Appendix J on scikit-learn's handwritten digits. Bias-free "
                    "and all-bias CNNs trained by SGD (batch 100) with the loss-based and a "
                    "constant step; Table 1 (checkpoints at training losses 10^-10, 10^-15, "
                    "10^-20, 10^-120 and the end) and L2 robustness between a certified bound "
                    "and an attack (Figure 8). Writes table1.md/.csv, epochs_*.csv, "
                    "robustness.csv, radii.npz, summary.json and fig*.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("name", choices=("paper-cnn",), help="the experiment")
    size = ex.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the test suite's tiny configuration (digits 0 vs 1, < 2 min)")
    size.add_argument("--full", action="store_true",
                      help="the paper's length: 10 000 epochs per run, every point attacked")
    ex.add_argument("--epochs", type=int, default=None,
                    help="epochs of the Table 1 run (bias-free CNN, loss-based)")
    ex.add_argument("--epochs-comparison", type=int, default=None,
                    help="epochs of each of the three comparison runs")
    ex.add_argument("--data", choices=("digits", "mnist1d", "mnist"), default=None,
                    help="mnist: real MNIST (the mnist extra); CPU-sized by default, the "
                         "paper's exact configuration with --full")
    ex.add_argument("--dtype", choices=("float64", "float32"), default=None,
                    help="float32: network in float32, loss in the log domain in float64 (K.2)")
    ex.add_argument("--classes", type=int, nargs="+", default=None,
                    help="keep only these classes (e.g. 0 1)")
    ex.add_argument("--channels", type=int, nargs="+", default=None, help="conv channels")
    ex.add_argument("--kernel", type=int, nargs="+", default=None, help="conv kernel sizes")
    ex.add_argument("--hidden", type=int, default=None, help="width of the dense layer")
    ex.add_argument("--attack-points", type=int, default=None,
                    help="points attacked per split (0: all)")
    ex.add_argument("--seed", type=int, default=None)
    ex.add_argument("--out", default=None,
                    help="output directory (default: a fresh directory under runs/)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace the experiment in --out (its files are deleted first)")
    ex.add_argument("--resume", action="store_true",
                    help="--out holds this experiment, interrupted (Ctrl-C: exit 130, every "
                         "record saved): continue each run from its last saved segment")
    ex.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ex.add_argument("--no-compile-cache", action="store_true",
                    help="do not use JAX's persistent compilation cache")
    ex.set_defaults(func=_experiment, parser=ex)
    return ex


def _experiment(args, parser) -> int:
    import dataclasses

    for name in ("epochs", "epochs_comparison", "hidden", "attack_points", "seed"):
        v = getattr(args, name)
        if v is not None and v < (0 if name in ("attack_points", "seed") else 1):
            _fail(parser, f"--{name.replace('_', '-')} must be >= "
                          f"{0 if name in ('attack_points', 'seed') else 1}, got {v}")
    if args.resume and not args.out:
        _fail(parser, "--resume needs the --out of the interrupted experiment")
    out = io.prepare_out(args.out or _default_out("paper-cnn"), overwrite=args.overwrite,
                         resume=args.resume, what="experiment")
    _setup_jax(args.no_compile_cache)
    from .experiments import paper_cnn

    config = paper_cnn.preset(args.quick, args.full, args.data)
    changes = {k: v for k, v in {
        "epochs": args.epochs, "epochs_comparison": args.epochs_comparison, "dtype": args.dtype,
        "classes": tuple(args.classes) if args.classes else None,
        "channels": tuple(args.channels) if args.channels else None,
        "kernel": tuple(args.kernel) if args.kernel else None, "hidden": args.hidden,
        "seed": args.seed}.items() if v is not None}
    if args.attack_points is not None:
        changes["attack_points"] = args.attack_points or None
    config = dataclasses.replace(config, **changes)
    # a signal stops the runs after the epoch in progress (or before the next checkpoint's
    # attacks) and writes every record with status "interrupted"
    with io.Interrupt() as stop:
        result = paper_cnn.run(config, out, progress=not args.no_progress,
                               log=lambda line: print(line, flush=True), stop=stop)
    if result["status"] == "interrupted":
        print(f"homoflow experiment: interrupted by {stop.name}; {result['message']}; every "
              f"record is in {out}; continue with the same options and --out {out} --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print((out / "table1.md").read_text())
    print("checks:", result["checks"])
    return 0


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homoflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"homoflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    _add_experiment_parser(sub)
    _add_sweep_parser(sub)
    _add_report_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, args.parser)
    except ValueError as e:   # bad input found while setting up (a data file, --out, ...)
        print(f"homoflow {args.command}: error: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:   # a second Ctrl-C: stop at once
        print(f"homoflow {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
