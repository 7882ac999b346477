"""Print the README's "Memory and time per GPU" section, computed by the memory planner.

Every number comes from ``smoltulu_utils.memory`` (``memory_table``, ``readme_section``): the method the
planner picks for each stage on each GPU, its estimated peak memory and the estimated hours. Nothing
is measured, so this runs in seconds on any machine.

    python benchmarks/memory_table.py                    # print the section (markdown)
    python benchmarks/memory_table.py --csv table.csv    # also write both tables, one row per stage x GPU
    python benchmarks/memory_table.py --check README.md  # exit 1 when the README's section is out of date
    python benchmarks/memory_table.py --update README.md # replace the README's section with this one
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smoltulu_utils.memory import README_HEADING, memory_table, readme_section


def replace_section(text: str, section: str) -> str:
    """``text`` with its "Memory and time per GPU" section (up to the next ``## `` heading) replaced."""
    start = text.find(README_HEADING + "\n")
    if start < 0:
        raise SystemExit(f"no '{README_HEADING}' heading in the file: add one where the section belongs")
    end = text.find("\n## ", start + len(README_HEADING))
    end = len(text) if end < 0 else end + 1
    return text[:start] + section + "\n" + ("\n" if end < len(text) else "") + text[end:]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, help="write both tables (profile, stage, GPU, method, ...) here")
    parser.add_argument("--check", type=Path, help="a README whose section must equal the printed one")
    parser.add_argument("--update", type=Path, help="a README whose section to replace")
    args = parser.parse_args(argv)

    section = readme_section()
    print(section)
    if args.csv:
        import pandas as pd

        frames = [memory_table(p).assign(profile=p) for p in ("paper", "single_gpu")]
        pd.concat(frames).to_csv(args.csv, index=False)
    if args.check and section not in args.check.read_text(encoding="utf-8"):
        print(f"\n{args.check} is out of date: run with --update {args.check}", file=sys.stderr)
        raise SystemExit(1)
    if args.update:
        args.update.write_text(replace_section(args.update.read_text(encoding="utf-8"), section), "utf-8")
    return section


if __name__ == "__main__":
    main()
