"""`convqa`: convert, inspect and diff models in SafeTensors, GGUF and APR; serve one over HTTP.

Exit status: 0 on success (and, for `diff`, when the models agree), 1 when `diff` finds a
difference, 2 on bad input (a malformed file, an impossible conversion, a bad argument).
`verdict` exits 0 QUALIFIED, 1 NOT QUALIFIED, 3 INCOMPLETE (2: the file is missing or malformed).
"""

from __future__ import annotations

import argparse
import json
import sys

from convqa import __version__

EXIT_DIFFERENT = 1
EXIT_BAD_INPUT = 2

DESCRIPTION = """\
convqa qualifies model-format converters. The subcommands here are the building blocks the
Snakemake workflow uses; you can run them by hand on any model file.

  convqa convert model_dir out.gguf                 SafeTensors -> GGUF (dtypes kept)
  convqa convert model_dir out.gguf --quant q8_0    ... quantized to Q8_0
  convqa convert out.gguf out.apr                   GGUF -> APR
  convqa inspect out.apr                            tensors, shapes, encodings, hashes, stats
  convqa diff model_dir out.apr                     tensor-by-tensor parity with a layout diagnosis
"""


def _cmd_convert(args) -> int:
    from convqa.convert.builtin import convert

    record = convert(args.src, args.dst, args.to, quant=args.quant, mutant=args.mutant)
    if args.json:
        print(json.dumps(record.as_dict(), indent=2))
    else:
        deq = f", {len(record.dequantized)} dequantized to F32 (target cannot hold them)" if record.dequantized else ""
        quant = f", {len(record.quantized)} quantized" if record.quantized else ""
        up = f", {len(record.upcast)} upcast to F32 (lossless; the target's runtime needs it)" if record.upcast else ""
        print(f"{record.source} -> {record.output} [{record.target_format}]: {record.tensors_written} tensors"
              f" {record.encodings_written}{quant}{deq}{up} in {record.wall_s:.2f} s")
    return 0


def _cmd_inspect(args) -> int:
    from convqa.inspect.manifest import build_manifest

    manifest = build_manifest(args.file, with_stats=not args.no_stats)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    cfg = manifest["config"]
    print(f"{manifest['path']}: {manifest['format']}, {manifest['tensor_count']} tensors, {manifest['file_size']} bytes")
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    tok = manifest["tokenizer"]
    print("tokenizer: " + (", ".join(f"{k}={v}" for k, v in tok.items()) if tok else "none"))
    for t in manifest["tensors"]:
        stats = t.get("stats") or {}
        stat = f" mean={stats['mean']:.4g} std={stats['std']:.4g}" if stats.get("mean") is not None else ""
        print(f"  {t['name']:<48} {str(t['shape']):<16} {t['encoding']:<6} {t['sha256'][:12]}{stat}")
    return 0


def _cmd_diff(args) -> int:
    from convqa.compare.blocks import describe as describe_blocks
    from convqa.compare.tensors import compare_models
    from convqa.formats import open_model

    with open_model(args.a) as a, open_model(args.b) as b:
        result = compare_models(a, b, tolerance=args.tolerance)
    # Within tolerance is not the same when a quantized tensor is not what the reference
    # quantizer writes for the source: that is a quantizer bug hiding in the error band.
    agree = result.ok and not result.reference_mismatches
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for row in result.tensors:
            if row.ok and not args.all:
                continue
            err = f" max|d|={row.max_abs:.3g} norm={row.normalized_max_abs:.3g} tol={row.tolerance:g}" if row.max_abs is not None else ""
            print(f"{row.status:<22} {row.name}{err} {row.diagnosis}".rstrip())
        for row in result.reference_mismatches:
            finding = row.reference_blocks
            print(f"reference quantizer    {describe_blocks(row.name, finding)}")
            if finding.get("map"):
                print(f"  blocks [{finding['map']}] ('#' = a differing block in that stretch)")
        for field, (ra, rb) in result.config_differences.items():
            print(f"config {field}: {ra!r} -> {rb!r}")
        for field, detail in result.tokenizer_differences.items():
            print(f"tokenizer {field}: {detail}")
        s = result.summary()
        quantizer = s.get("reference_quantizer")
        blocks = (f"; {quantizer['differing']} of {quantizer['tensors']} quantized tensors differ from the reference "
                  "quantizer" if quantizer else "")
        print(f"{'SAME' if agree else 'DIFFERENT'}: {s['tensors']} tensors {s['by_status']}{blocks}")
    return 0 if agree else EXIT_DIFFERENT


def _cmd_serve(args) -> int:
    from convqa.infer.server.app import run_server

    run_server(args.file, tokenizer_dir=args.tokenizer, host=args.host, port=args.port, backend=args.backend)
    return 0


def _cmd_mutants(args) -> int:
    from convqa.convert.mutants import MUTANTS

    for m in MUTANTS.values():
        print(f"{m.name:<22} [{', '.join(m.targets)}] {m.bug} ({m.origin})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convqa", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"convqa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a model between SafeTensors, GGUF and APR",
                       description="Convert SRC into DST. SRC is an HF directory (config.json + *.safetensors), a .gguf or an .apr file. "
                       "The output is written to a temporary file and renamed only on success.")
    p.add_argument("src", help="source model: HF directory, .safetensors, .gguf or .apr")
    p.add_argument("dst", help="output path: a directory for SafeTensors, a .gguf or .apr file")
    p.add_argument("--to", choices=["gguf", "apr", "safetensors"], help="target format (default: from DST's extension)")
    p.add_argument("--quant", help="quantize 2-D weights: q8_0, q4_0, q4_1, q5_0, q5_1 (GGUF), q8_0/q4_0 (APR int8/int4), f16, bf16")
    p.add_argument("--mutant", help="use a known-bad converter (see `convqa mutants`); for qualification tests only")
    p.add_argument("--json", action="store_true", help="print the conversion record as JSON")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("inspect", help="list tensors, shapes, encodings, hashes, stats, config and tokenizer")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    p.add_argument("--no-stats", action="store_true", help="skip value statistics (faster on big models)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("diff", help="compare two models tensor by tensor (exit 1 if they differ)",
                       description="Compare B against reference A on the canonical view: names, shapes, values (bit-exact when "
                       "both sides have the same encoding, else within the lossier encoding's tolerance), config and tokenizer. "
                       "Differences come with a diagnosis such as 'equals the transpose'.")
    p.add_argument("a", help="reference model")
    p.add_argument("b", help="candidate model")
    p.add_argument("--tolerance", type=float, help="override the normalised max-error tolerance for every tensor")
    p.add_argument("--all", action="store_true", help="also list tensors that agree")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API on 127.0.0.1")
    p.add_argument("file", help="model to serve (any format; loaded with transformers)")
    p.add_argument("--tokenizer", required=True, help="HF directory whose tokenizer turns text into ids (the ground truth's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on startup)")
    p.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("plan", help="estimate the disk and CPU time a tier needs for a model, before a run",
                       description="Estimate, from MODEL's size (read from its header), the bytes a tier's conversions write, "
                       "the peak disk with temp_intermediates, and the CPU time (convqa.workflow.estimate).")
    p.add_argument("model", help="the model to qualify: HF directory, .gguf or .apr")
    p.add_argument("--tier", default="mvp", choices=["smoke", "mvp", "full"])
    p.add_argument("--config", default="config/config.yaml", help="workflow config for variants and inference chains")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("mutants", help="list the known-bad converters")
    p.set_defaults(func=_cmd_mutants)

    p = sub.add_parser("verdict", help="print the verdict of a qualification; exit 0 QUALIFIED, 1 NOT QUALIFIED, 3 INCOMPLETE",
                       description="Read results/summary/<tier>/summary.json (every model) or one model's qualification.json "
                       "and exit with the verdict: 0 QUALIFIED, 1 NOT QUALIFIED, 3 INCOMPLETE, 2 when the file is missing or "
                       "malformed. snakemake itself exits 0 whenever the qualification ran, whatever the verdict.")
    p.add_argument("file", help="summary.json or qualification.json")
    p.set_defaults(func=_cmd_verdict)
    return parser


def _cmd_plan(args) -> int:
    import json
    from pathlib import Path

    import yaml

    from convqa.workflow.estimate import estimate_model, format_estimate
    from convqa.workflow.jobs import served_cells

    config = yaml.safe_load(Path(args.config).read_text()) if Path(args.config).is_file() else {}
    inference = config.get("inference") or {}
    chains = (inference.get("chains") or {}).get(args.tier, ["st", "st-gguf", "st-apr"])
    engines = list(inference.get("engines") or ["transformers", "llama.cpp"])
    # The workflow's own rule for what is served (config/schema.yaml's defaults where unset).
    served = served_cells({"engines": engines, "chains": {args.tier: chains},
                           "modalities": inference.get("modalities") or ["run", "chat", "serve"],
                           "serve": {args.tier: (inference.get("serve") or {}).get(
                               args.tier, ["st-apr:transformers", "st-gguf:llama.cpp"])}}, args.tier)
    result = estimate_model(args.model, args.tier, list(config.get("variants") or ["native", "q8_0"]), chains,
                            engines=len(engines), cores=args.cores, served=served)
    print(json.dumps(result, indent=2) if args.json else format_estimate(result))
    return 0


def _cmd_verdict(args) -> int:
    from convqa.report.summary import VERDICT_EXIT, read_verdicts

    overall, models = read_verdicts(args.file)
    for model, verdict in models:
        print(f"{model}: {verdict}")
    print(f"verdict: {overall}")
    return VERDICT_EXIT[overall]


def main(argv: list[str] | None = None) -> int:
    from convqa.errors import ConversionError, FormatError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FormatError, ConversionError) as exc:
        print(f"convqa: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
