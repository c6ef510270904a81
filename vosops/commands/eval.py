"""`vosops eval`: J and F of predicted masks against DAVIS ground truth; a per-sequence table and a CSV."""

from __future__ import annotations

import os

from ._args import positive_int


def register(sub) -> None:
    p = sub.add_parser("eval", help="J&F of predicted masks (PRED/<seq>/<frame>.png) against DAVIS annotations")
    p.add_argument("--pred", required=True, help="folder of sequence folders of palette PNGs")
    p.add_argument("--gt", required=True, help="DAVIS root (Annotations/480p) or a folder of sequence folders")
    p.add_argument("--csv", default=None, help="CSV path (default: PRED/results.csv)")
    p.add_argument("--sequences", nargs="*", default=None, help="only these sequences (default: all in PRED)")
    p.add_argument("--workers", type=positive_int, default=None, help="parallel sequences (default: up to 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from vosops import metrics

    t0 = time.perf_counter()
    scores, table, summary = metrics.evaluate_folders(args.pred, args.gt, sequences=args.sequences,
                                                      workers=args.workers)
    unscored = metrics.unscored_sequences(args.sequences or metrics.prediction_sequences(args.pred), table)
    print(metrics.format_table(table, summary, unscored))
    unpredicted = [] if args.sequences else metrics.unpredicted_sequences(args.pred, args.gt)
    if unpredicted:
        print(f"ground truth without predictions (not scored; the mean is over the others): {unpredicted}")
    path = args.csv or os.path.join(args.pred, "results.csv")
    metrics.write_csv(path, scores, table, summary)
    print(f"\nJ&F-Mean {summary['J&F-Mean']:.4f} over {len(scores)} objects in {len(table)} sequences "
          f"({time.perf_counter() - t0:.1f} s); wrote {path}")
    return 0
