"""`python -m bench`: our throughput against the peer a user would pick instead, on this machine, as one
markdown table, printed and written to bench/results/DEVICE.md.

    python -m bench --quick                      # under 3 minutes on a 2-core CPU
    python -m bench --device cuda                # thorough, on the GPU
    python -m bench --rows unet-train-cifar10 kernels

Each row times our code in plain fp32 and under the fastest of a few settings (bf16 autocast,
channels_last, torch.compile: measured, not assumed), and the peer (diffusers, pytorch-fid,
torchvision; bench/requirements.txt) at its defaults, alternating the two. A peer that is not
installed leaves its columns empty and the row still shows our numbers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.suite import ROWS, default_output, device_and_plan, report, run
from core import cli
from core.runtime import atomic_write


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--quick", action="store_true",
                        help="small batches, few repeats, fewer variants (default: off)")
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS), metavar="ROW",
                        help=f"row groups to measure, in table order (default: all: {' '.join(ROWS)})")
    parser.add_argument("--out", default="", help="markdown file to write (default: bench/results/DEVICE.md)")
    args = parser.parse_args(argv)
    if args.out and (Path(args.out).suffix != ".md" or Path(args.out).is_dir()
                     or any(p.is_file() for p in Path(args.out).parents)):
        parser.exit(2, f"error: --out {args.out} must name a markdown file (.md) in a folder; measuring would "
                       f"otherwise be lost when the table could not be written.\n")
    start = time.perf_counter()
    try:
        plan = device_and_plan(args.device, args.quick)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    out = Path(args.out) if args.out else default_output(plan.device)
    try:  # a folder the table cannot be written into is found now, not after minutes of measuring
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        parser.exit(2, f"error: cannot write the table into {out.parent} ({err.strerror or err}); pass --out in a "
                       f"folder you can write.\n")
    names = [name for name in ROWS if name in args.rows]
    rows = run(plan, names, progress=lambda line: print(line, file=sys.stderr, flush=True))
    command = "python -m bench " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    text = report(rows, plan, command.strip())
    atomic_write(out, lambda f: f.write(text.encode()))  # a full disk leaves the table that was there
    print(text)
    print(f"written to {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    cli.main(main)  # Ctrl-C, SIGTERM, a full disk: one line
