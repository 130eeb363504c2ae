#!/usr/bin/env python3
"""A stand-in for the APR toolchain's converter, with its command shape:

    apr rosetta convert SRC DST [--quantize Q]

The real `apr` binary cannot be installed here. This script is installed as an executable named
`apr` (tests copy it into a directory on PATH) and does the conversion with convqa's converter,
the target format following DST's extension as `apr rosetta convert` does (.gguf, .apr, a
directory for SafeTensors). Anything else it is asked to do is an error with a non-zero exit,
like an unknown subcommand of the real tool.
"""

import argparse
import sys

from convqa.convert.builtin import convert
from convqa.errors import ConversionError, FormatError

USAGE_ERROR = 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="apr")
    tools = parser.add_subparsers(dest="tool", required=True)
    rosetta = tools.add_parser("rosetta").add_subparsers(dest="command", required=True)
    converting = rosetta.add_parser("convert", help="convert SRC into DST (format from DST's extension)")
    converting.add_argument("src")
    converting.add_argument("dst")
    converting.add_argument("--quantize", default=None)
    args = parser.parse_args(argv)
    try:
        record = convert(args.src, args.dst, quant=args.quantize or None)
    except (ConversionError, FormatError) as exc:
        print(f"apr rosetta convert: {exc}", file=sys.stderr)
        return 1
    print(f"apr rosetta convert: wrote {record.tensors_written} tensors to {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
