"""``homoflow run``: simulate gradient descent on a homogeneous model and report its margins."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import jax

from . import data as data_mod
from . import kkt, losses, models, schedules
from .descent import RunStopped, descent
from .flow import flow
from .plots import plot_trajectory
from .problem import make_problem

MODELS = ("mlp", "linear", "deep_linear", "diagonal_linear")
ACTIVATION_CHOICES = ("relu", "leaky_relu", "relu_power", "quadratic")
POLICIES = ("loss_based", "constant", "h_bound", "normalized", "sign", "coordinate", "lp",
            "dual_acceleration", "progressive_rescaling", "adam", "rmsprop", "adagrad",
            "sign_sgd", "sgd_optax")
STEEPEST = {"sign": "inf", "coordinate": 1.0, "lp": None}   # None: --p


def _build_model(args, dim, n_outputs):
    if args.model == "linear":
        return models.linear(dim, n_outputs)
    if args.model == "deep_linear":
        return models.deep_linear((dim,) + (args.width,) * (args.depth - 1) + (n_outputs,))
    if args.model == "diagonal_linear":
        if n_outputs != 1:
            raise ValueError("diagonal_linear is a binary model; use --data separable")
        return models.diagonal_linear(dim, args.depth)
    act = {"relu": models.relu, "quadratic": models.quadratic,
           "leaky_relu": lambda: models.leaky_relu(args.slope),
           "relu_power": lambda: models.relu_power(args.alpha_power)}[args.activation]()
    return models.mlp((dim,) + (args.width,) * (args.depth - 1) + (n_outputs,), act)


def _build_policy(args):
    if args.policy in STEEPEST:   # steepest descent; --step picks the step rule
        step = _build_policy(argparse.Namespace(**{**vars(args), "policy": args.step}))
        return schedules.steepest(args.p if STEEPEST[args.policy] is None
                                  else STEEPEST[args.policy], step)
    if args.policy == "normalized":
        return schedules.normalized(args.alpha0)
    if args.policy == "dual_acceleration":
        return schedules.dual_acceleration()
    if args.policy == "progressive_rescaling":
        return schedules.progressive_rescaling(args.lr)
    if args.policy == "loss_based":
        return schedules.loss_based(alpha0=args.alpha0)
    if args.policy == "constant":
        return schedules.constant(args.lr)
    if args.policy == "h_bound":
        return schedules.h_bound(c_eta=args.c_eta, lr_before_t0=args.lr)
    import optax

    opt = {"adam": optax.adam, "rmsprop": optax.rmsprop, "adagrad": optax.adagrad,
           "sign_sgd": optax.sign_sgd, "sgd_optax": optax.sgd}[args.policy]
    return schedules.optax_optimizer(optax.inject_hyperparams(opt)(learning_rate=args.lr),
                                     objective=args.objective)


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
    rows.append(("wall time (s)", f"{summary['wall_time_s']:.2f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _run(args) -> int:
    if args.data == "separable":
        X, y = data_mod.linearly_separable(args.n, args.dim, args.data_seed)
        n_outputs = 1
    else:
        X, y = data_mod.gaussian_classes(args.n, args.dim, args.classes, args.data_seed)
        n_outputs = args.classes
    if args.loss == "cross_entropy" and n_outputs == 1:
        raise ValueError("--loss cross_entropy needs --data gaussian_classes")
    model = _build_model(args, args.dim, n_outputs)
    problem = make_problem(model, losses.get_loss(args.loss), X, y)
    policy = _build_policy(args)
    params0 = model.init(jax.random.PRNGKey(args.seed))
    out = Path(args.out) if args.out else Path("runs") / _dt.datetime.now().strftime(
        "run-%Y%m%d-%H%M%S-%f")
    config = {k: v for k, v in vars(args).items() if k != "func"}
    how = (f"gradient flow to log t = {args.log_t_max:g}" if args.engine == "flow"
           else f"{policy.name} steps, {args.steps} iterations")
    print(f"homoflow run: {model.name} (L = {model.order:g}, "
          f"{len(jax.tree_util.tree_leaves(params0))} weight arrays) on {args.data} data "
          f"(N = {args.n}, d = {args.dim}), {args.loss} loss, {how}")
    code = 0
    try:
        if args.engine == "flow":
            traj = flow(problem, params0, log_t_max=args.log_t_max,
                        progress=not args.no_progress, config=config)
        else:
            traj = descent(problem, params0, policy, args.steps, batch_size=args.batch_size,
                           key=jax.random.PRNGKey(args.seed), progress=not args.no_progress,
                           config=config, margin_norm=args.margin_norm)
    except RunStopped as stop:
        traj, code = stop.trajectory, 2
        print(f"stopped: {stop}", file=sys.stderr)
    traj.meta["seed"] = args.seed
    traj.save(out)
    plot_trajectory(traj, out)
    summary = traj.summary()
    print(_summary_table(summary))
    if summary["status"] == "not_separated":
        print(f"note: {summary['message']}")
    files = "trajectory.csv, columns.npz, snapshots.npz, meta.json, summary.json, loss.png, " \
            "margins.png, rho.png, beta.png"
    if not args.no_kkt_report and summary["status"] != "not_separated":
        try:
            report = kkt.convergence_report(problem, traj)
        except ValueError as err:  # e.g. no saved point after separation
            print(f"no convergence report: {err}")
        else:
            print("\nconvergence to a KKT point of (P) (last decades of log T):")
            print(kkt.format_report(report))
            (out / "convergence.md").write_text(kkt.format_report(report, max_rows=50) + "\n")
            kkt.plot_report(report, out / "convergence.png")
            files += ", convergence.md, convergence.png"
    print(f"run directory: {out}  ({files})")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run gradient descent on a homogeneous model",
        description="Run gradient descent and record margins. The default problem: a "
                    "bias-free two-layer ReLU network of width 100 on 100 linearly separable "
                    "Gaussian points in 10 dimensions, exponential loss, the loss-based "
                    "step-size scheduler of Appendix K.1, 10^4 iterations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--engine", choices=("descent", "flow"), default="descent",
                     help="gradient descent, or gradient flow (diffrax, then log-polar time)")
    run.add_argument("--log-t-max", type=float, default=100.0,
                     help="flow: stop at this log t (natural log of time)")
    run.add_argument("--model", choices=MODELS, default="mlp", help="model family")
    run.add_argument("--activation", choices=ACTIVATION_CHOICES, default="relu",
                     help="mlp activation")
    run.add_argument("--slope", type=float, default=0.1, help="leaky_relu slope")
    run.add_argument("--alpha-power", type=float, default=3.0,
                     help="exponent of relu_power (smooth for > 2)")
    run.add_argument("--width", type=int, default=100, help="hidden width (mlp, deep_linear)")
    run.add_argument("--depth", type=int, default=2,
                     help="number of weight layers (mlp, deep_linear, diagonal_linear)")
    run.add_argument("--loss", choices=sorted(losses.LOSSES), default="exponential")
    run.add_argument("--data", choices=sorted(data_mod.DATASETS), default="separable",
                     help="separable: Gaussian points labelled by a hyperplane; "
                          "gaussian_classes: --classes Gaussian clusters")
    run.add_argument("--n", type=int, default=100, help="number of data points")
    run.add_argument("--dim", type=int, default=10, help="input dimension")
    run.add_argument("--classes", type=int, default=3, help="classes for gaussian_classes")
    run.add_argument("--data-seed", type=int, default=0)
    run.add_argument("--policy", choices=POLICIES, default="loss_based",
                     help="step sizes: loss_based (eta = alpha/L, Appendix K.1), constant "
                          "(--lr), h_bound (eta = H(L), Appendix E.1, needs --c-eta), "
                          "normalized (eta = alpha0/L fixed); steepest descent in a norm: "
                          "sign (l_inf), coordinate (l1), lp (--p), each with --step; the "
                          "fast margin maximizers dual_acceleration and "
                          "progressive_rescaling (--lr: its step); or an optax optimizer "
                          "(adam, rmsprop, adagrad, sign_sgd, sgd_optax) with --lr and "
                          "--objective")
    run.add_argument("--p", type=float, default=2.0,
                     help="lp: the norm of steepest descent, in [1, inf]")
    run.add_argument("--step", choices=("loss_based", "normalized", "constant"),
                     default="loss_based", help="sign, coordinate, lp: their step rule")
    run.add_argument("--objective", choices=("loss", "log_loss"), default="loss",
                     help="optax optimizers: minimize L (default, as before) or log L. "
                          "log_loss keeps the gradient of order one, so an adaptive "
                          "method's eps does not turn it into GD: with it Adam reaches the "
                          "l_inf max-margin limit, with loss it stalls near GD's l2 "
                          "direction (grad L underflows with L)")
    run.add_argument("--margin-norm", type=float, default=None,
                     help="also record the margins in this l_p norm (e.g. the --p of lp)")
    run.add_argument("--lr", type=float, default=1e-4,
                     help="constant step; h_bound: step before t0; optax: learning rate")
    run.add_argument("--alpha0", type=float, default=0.1, help="loss_based initial alpha")
    run.add_argument("--c-eta", type=float, default=None, help="C_eta of the H(L) bound")
    run.add_argument("--steps", type=int, default=10_000,
                     help="iterations (GD steps, or SGD epochs with --batch-size)")
    run.add_argument("--batch-size", type=int, default=None,
                     help="mini-batch size for SGD (default: full batch)")
    run.add_argument("--seed", type=int, default=0, help="seed of the initialization")
    run.add_argument("--out", default=None,
                     help="run directory (default: a fresh directory under runs/)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--no-kkt-report", action="store_true",
                     help="skip the closing convergence report (KKT residuals, polished point)")
    run.set_defaults(func=_run)
    _add_experiment_parser(sub)
    _add_sweep_parser(sub)
    return parser


# ---------------------------------------------------------------------------------------
# homoflow sweep

_SWEEP_AXES = {  # option -> (type, help); every option takes one or more values
    "engine": (str, "descent or flow"), "model": (str, "mlp, deep_linear, diagonal_linear, linear"),
    "activation": (str, "mlp activation: relu or quadratic"), "depth": (int, "weight layers"),
    "width": (int, "hidden width"), "loss": (str, "exponential, logistic, cross_entropy"),
    "data": (str, "separable or gaussian_classes"), "n": (int, "data points"),
    "dim": (int, "input dimension"), "classes": (int, "classes of gaussian_classes"),
    "data_seed": (int, "seed of the data (vmapped)"),
    "seed": (int, "seed of the initialization (vmapped)"),
    "policy": (str, "constant, loss_based, h_bound, normalized, sign, coordinate or lp"),
    "step": (str, "sign, coordinate, lp: step rule loss_based, normalized or constant"),
    "p": (float, "lp: the norm, in [1, inf] (vmapped)"),
    "lr": (float, "constant step; h_bound: step before t0 (vmapped)"),
    "alpha0": (float, "loss_based initial alpha (vmapped)"),
    "r_u": (float, "loss_based growth factor (vmapped)"),
    "r_d": (float, "loss_based back-off factor (vmapped)"),
    "c_eta": (str, "h_bound C_eta, or 'estimate' for sampled B0, B1, B2 (vmapped)"),
    "fraction": (float, "h_bound: eta = fraction * H(L) (vmapped)"),
    "steps": (int, "descent iterations"), "n_records": (int, "recorded points per run"),
    "log_t_max": (float, "flow: stop at this log t"), "n_saves": (int, "flow: saved points"),
}


def _add_sweep_parser(sub):
    sw = sub.add_parser(
        "sweep", help="run a grid of configurations (vmapped, sharded over all devices)",
        description="Run every configuration of a grid and write one tidy table "
                    "(table.npz, table.csv, sweep.json) to --out. The grid comes from a TOML "
                    "file (--grid; keys as in homoflow.sweep.DEFAULTS, a list is an axis) and "
                    "from the options below, which override it; each option takes one or "
                    "more values. Step sizes, policy parameters and seeds are vmapped; depth, "
                    "width, model and loss loop over compiled programs. Started again with "
                    "the same --out, an interrupted sweep computes only what is missing.")
    sw.add_argument("--grid", default=None, help="TOML file with the grid")
    for name, (typ, hlp) in _SWEEP_AXES.items():
        sw.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, nargs="+",
                        default=None, help=hlp)
    sw.add_argument("--out", default=None,
                    help="output directory (default: a fresh directory under runs/)")
    sw.add_argument("--max-batch", type=int, default=4096,
                    help="at most this many configurations per compiled call")
    sw.add_argument("--devices", type=int, default=None,
                    help="use the first N devices (default: all)")
    sw.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() first (multi-node)")
    sw.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sw.set_defaults(func=_sweep)


def _sweep(args) -> int:
    import tomllib

    from . import sweep as sweep_mod

    if args.distributed:
        jax.distributed.initialize()
    grid = {}
    if args.grid:
        with open(args.grid, "rb") as fh:
            grid.update(tomllib.load(fh))
    for name in _SWEEP_AXES:
        values = getattr(args, name)
        if values is not None:
            if name == "c_eta":
                values = [v if v == "estimate" else float(v) for v in values]
            grid[name] = values if len(values) > 1 else values[0]
    out = Path(args.out) if args.out else Path("runs") / _dt.datetime.now().strftime(
        "sweep-%Y%m%d-%H%M%S-%f")
    devices = None if args.devices is None else jax.devices()[: args.devices]
    table = sweep_mod.sweep(grid, out=out, devices=devices, max_batch=args.max_batch,
                            progress=not args.no_progress)
    print(f"homoflow sweep: {table.meta['n_configs']} configurations "
          f"({len(table.meta['computed'])} computed, {len(table.meta['reused'])} reused) on "
          f"{table.meta['devices']} device(s), {len(table)} rows in "
          f"{table.meta['wall_time_s']:.1f} s")
    for status in sorted(set(table.meta["statuses"])):
        print(f"  {status}: {table.meta['statuses'].count(status)}")
    print(f"sweep directory: {out}  (table.npz, table.csv, sweep.json, manifest.json, configs/)")
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
    ex.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ex.set_defaults(func=_experiment)


def _experiment(args) -> int:
    import dataclasses

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
    out = Path(args.out) if args.out else Path("runs") / _dt.datetime.now().strftime(
        "paper-cnn-%Y%m%d-%H%M%S")
    result = paper_cnn.run(config, out, progress=not args.no_progress)
    print((out / "table1.md").read_text())
    print("checks:", result["checks"])
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.policy == "h_bound" and args.c_eta is None:
        parser.error("--policy h_bound needs --c-eta")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"homoflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
