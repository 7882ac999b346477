"""Conversations per second of the kit's contamination scan, and the projected time for the full SFT mixture.

The kit side is ``smoltulu_utils.contamination``: the benchmark items' 8-grams in one dict, the SFT
rows streamed once (each JSON line parsed, its user turns normalised and looked up). The rows are the
mirror's ``tulu3_sft`` file (or ``--rows``), cycled until ``--min-rows`` rows have been scanned, so the
timing covers JSON parsing as a real run does. The projected time is the full mixture's row count
(939,344 conversations, the dataset card) over the measured rate; it holds as far as the timed rows
are as long as the real mixture's (``words_per_row`` in the JSON says how long they were).

The baseline is the direct way without an index: for each training document, check every item's
n-grams against the document's n-gram set (work grows with items x documents). It runs on the first
``--baseline-rows`` rows; ``agreement`` checks that both find the same best coverage for every item.
``--kind preference`` or ``rlvr`` times rows of the other mixtures (pass their row count as ``--full-rows``).
Run: ``python benchmarks/contamination_scan.py [--mirror DIR] [--rows FILE] [--min-rows N]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

from smoltulu_utils.atomic import atomic_open
from smoltulu_utils.contamination import (
    BENCHMARKS,
    NGRAM_SIZE,
    THRESHOLD,
    NgramIndex,
    benchmark_items,
    normalize,
    scan_rows,
)
from smoltulu_utils.data import FULL_ROWS, mirror_path, prompt_texts
from smoltulu_utils.hardware import detect_hardware, hardware_report
from smoltulu_utils.paths import FIXTURES_DIR, results_dir


def baseline_best(index: NgramIndex, rows: list[dict], kind: str) -> tuple[dict[int, float], float]:
    """Best coverage per item by brute force (every item against every document), and the seconds taken."""
    n, best = index.n, {}
    windows = [[(i, item.tokens[i : i + n]) for i in range(len(item.tokens) - n + 1)] for item in index.items]
    start = time.perf_counter()
    for row in rows:
        for text in prompt_texts(kind, row):
            tokens = normalize(text)
            grams = {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
            for number, item_windows in enumerate(windows):
                covered = {j for i, gram in item_windows if gram in grams for j in range(i, i + n)}
                if covered:
                    score = len(covered) / len(index.items[number].tokens)
                    best[number] = max(best.get(number, 0.0), score)
    return best, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mirror", type=Path, default=FIXTURES_DIR, help="benchmark rows (default the fixtures)"
    )
    parser.add_argument("--rows", type=Path, default=None, help="JSONL of SFT rows (default the mirror's)")
    parser.add_argument("--min-rows", type=int, default=20_000, help="rows to scan (the file is cycled)")
    parser.add_argument("--baseline-rows", type=int, default=50, help="rows the brute-force baseline scans")
    parser.add_argument("--kind", default="sft", choices=("sft", "preference", "rlvr"), help="row schema")
    parser.add_argument(
        "--full-rows", type=int, default=FULL_ROWS["tulu3_sft"], help="rows of the full mixture"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)
    out = args.out or results_dir() / "benchmarks" / "contamination_scan.json"
    rows_file = args.rows or mirror_path("tulu3_sft", root=args.mirror)

    start = time.perf_counter()
    items = benchmark_items(BENCHMARKS, mirror=args.mirror)
    index = NgramIndex(items)
    index_seconds = time.perf_counter() - start
    lines = [line for line in rows_file.read_text(encoding="utf-8").split("\n") if line.strip()]
    n_rows = max(args.min_rows, len(lines))
    stream = (json.loads(line) for line in itertools.islice(itertools.cycle(lines), n_rows))
    kit = scan_rows(index, stream, kind=args.kind, mixture="tulu3_sft")
    sample = [json.loads(line) for line in lines[: args.baseline_rows]]
    texts = [text for row in sample for text in prompt_texts(args.kind, row)]
    words = sum(len(normalize(text)) for text in texts) / max(len(sample), 1)

    base_best, base_seconds = baseline_best(index, sample, args.kind)
    kit_sample = scan_rows(index, sample, kind=args.kind)
    kit_best = {number: match.score for number, match in kit_sample.best.items()}
    agree = base_best.keys() == kit_best.keys() and all(
        abs(base_best[k] - kit_best[k]) < 1e-9 for k in base_best
    )
    base_rate = len(sample) / base_seconds if base_seconds > 0 else float("nan")
    hw = detect_hardware()
    report = {
        "benchmark": "contamination_scan",
        "mirror": str(args.mirror),
        "rows_file": str(rows_file),
        "ngram": NGRAM_SIZE,
        "threshold": THRESHOLD,
        "items": len(index.items),
        "items_short": index.n_short,
        "index_ngrams": len(index),
        "index_seconds": index_seconds,
        "distinct_rows": len(lines),
        "kind": args.kind,
        "words_per_row": words,
        "words_per_s": words * kit.rows_per_second,
        "kit": {
            "rows": kit.n_rows,
            "documents": kit.n_documents,
            "seconds": kit.seconds,
            "rows_per_s": kit.rows_per_second,
            "items_matched": len(kit.best),
            "items_contaminated": len(kit.contaminated()),
        },
        "baseline": {"rows": len(sample), "seconds": base_seconds, "rows_per_s": base_rate},
        "ratio": kit.rows_per_second / base_rate,
        "agreement": agree,
        "full_rows": args.full_rows,
        "projected_full_seconds": args.full_rows / kit.rows_per_second,
        "projected_full_seconds_baseline": args.full_rows / base_rate,
        "machine": asdict(hw),
    }
    with atomic_open(out) as fh:
        fh.write(json.dumps(report, indent=2) + "\n")

    print(hardware_report(hw))
    print(f"index: {len(index.items)} items ({index.n_short} shorter than {NGRAM_SIZE} words), "
          f"{len(index):,} distinct {NGRAM_SIZE}-grams, built in {index_seconds:.1f} s")  # fmt: skip
    print(f"rows: {rows_file} ({len(lines)} distinct, {words:.0f} prompt words per row on average)")
    print(f"kit:      {kit.n_rows:>8,} rows in {kit.seconds:7.2f} s = {kit.rows_per_second:>9,.0f} rows/s "
          f"({report['words_per_s']:,.0f} prompt words/s)")  # fmt: skip
    print(f"baseline: {len(sample):>8,} rows in {base_seconds:7.2f} s = {base_rate:>9,.1f} rows/s "
          f"(every item against every document); ratio {report['ratio']:,.0f}x; same scores: {agree}")  # fmt: skip
    print(f"projected full mixture ({args.full_rows:,} rows): {report['projected_full_seconds'] / 60:.1f} min "
          f"(baseline {report['projected_full_seconds_baseline'] / 3600:.1f} h)")  # fmt: skip
    print(f"written to {out}")
    return report


if __name__ == "__main__":
    main()
