"""Issue 17, item 4: how much the normalized margin grows between Table 1's checkpoints, per
run, beside the paper's (model-1 -> model-4: 5.65e-5 -> 4.61e-4, x8.2).

Reads the Table 1 run (CNN without bias, loss-based) of each ``homoflow experiment
paper-cnn`` output directory given (finished or interrupted: only its
``epochs_no_bias_loss_based.csv`` is needed), takes the normalized margin q_min / prod
||W_i|| (Appendix J.1) at the first epoch whose training loss is below each threshold, and
prints the growth ratios against the 10^-10 checkpoint. A threshold a run did not reach is
"-". Each ``LABEL=DIR`` names a run; the label should say what differs between them (data
set, widths, training subset, scheduler constants), which is the ablation.

    python benchmarks/margin_ablation.py "MNIST 4000, (4,8,32)=runs/mnist-cpu" \\
        "digits, (8,16,32)=runs/paper-cnn" [--thresholds -10 -15 -20 -40 -80 -120]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RESULTS, write_report  # noqa: E402

from homoflow.experiments import paper_cnn  # noqa: E402


def margins_at(rows: list[dict], thresholds) -> dict:
    """{threshold: (epoch, normalized margin)} at the first epoch below each threshold."""
    out = {}
    for thr in thresholds:
        hit = next((r for r in rows if float(r["log10_loss"]) < thr), None)
        if hit is not None:
            out[thr] = (int(float(hit["epoch"])), float(hit["normalized_margin"]))
    return out


def read_run(directory: Path) -> list[dict]:
    path = Path(directory) / f"epochs_{paper_cnn.TABLE_RUN.replace('/', '_')}.csv"
    if not path.exists():
        raise SystemExit(f"{path}: no Table 1 run there (expected a paper-cnn output directory)")
    with open(path) as fh:
        return list(csv.DictReader(fh))


def table(runs: dict, thresholds) -> str:
    base = thresholds[0]
    head = ("| run | " + " | ".join(f"γ̄ at 10^{t:g} (epoch)" for t in thresholds)
            + " | " + " | ".join(f"ratio 10^{t:g} / 10^{base:g}" for t in thresholds[1:])
            + " |\n|" + "---|" * (2 * len(thresholds)) + "\n")
    paper = {round(lg): (e, g) for _, e, lg, g, _, _ in paper_cnn.PAPER_TABLE1}
    lines = []
    for label, found in [("Lyu & Li, Table 1 (MNIST, full CNN)",
                          {t: paper[t] for t in thresholds if t in paper}), *runs.items()]:
        cells = [f"{found[t][1]:.3g} ({found[t][0]})" if t in found else "-" for t in thresholds]
        ratios = [f"×{found[t][1] / found[base][1]:.2f}" if t in found and base in found
                  and found[base][1] > 0 else "-" for t in thresholds[1:]]
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |\n")
    return head + "".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=DIR, a paper-cnn output directory")
    ap.add_argument("--thresholds", type=float, nargs="+",
                    default=[-10.0, -15.0, -20.0, -40.0, -80.0, -120.0],
                    help="log10 training losses; the first is the ratios' base")
    ap.add_argument("--out", default=str(RESULTS / "margin_ablation.json"))
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, directory = spec.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"run {spec!r}: expected LABEL=DIR")
        runs[label] = margins_at(read_run(Path(directory)), args.thresholds)
    text = table(runs, [float(t) for t in args.thresholds])
    print(text)
    write_report({"thresholds": args.thresholds, "table": text,
                  "runs": {k: {str(t): v for t, v in d.items()} for k, d in runs.items()}},
                 Path(args.out), "margin_ablation.py", list(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
