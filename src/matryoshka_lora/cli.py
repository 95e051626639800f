"""`mlora` command line. Each command maps to one library function; options come from the config
dataclasses (their help text is the --help text), so the CLI holds no logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from pathlib import Path


def _parse_list(cast):
    def parse(text: str):
        return [cast(x) for x in text.split(",") if x.strip()]
    return parse


def _parse_weights(text: str) -> dict[int, float]:
    out = {}
    for item in text.split(","):
        q, _, w = item.partition(":")
        if not w:
            raise argparse.ArgumentTypeError(f"weights must look like '1:0.5,2:0.5' (rank:weight); got {text!r}")
        out[int(q)] = float(w)
    return out


def _targets(text: str):
    return text if "," not in text else [t for t in text.split(",") if t]


def _option_kwargs(name: str, hint) -> dict:
    """argparse kwargs for a dataclass field type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if name == "target_modules":
        return {"type": _targets, "metavar": "NAMES"}
    if name == "weights":
        return {"type": _parse_weights, "metavar": "R:W,..."}
    base = hint if not args or typing.get_origin(hint) in (list, dict) else (args[0] if len(args) == 1 else hint)
    origin = typing.get_origin(base)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        (inner,) = typing.get_args(base)
        return {"type": _parse_list(inner), "metavar": "A,B,..."}
    if origin in (typing.Union, types.UnionType):
        return {"type": str}
    return {"type": base}


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """One --flag per run option (see experiment.flat_fields), grouped by section."""
    from .experiment import SECTIONS, flat_fields

    groups = {s: parser.add_argument_group(f"{s} options") for s in SECTIONS}
    hints = {s: typing.get_type_hints(cls) for s, cls in SECTIONS.items()}
    for key, (section, f) in flat_fields().items():
        kwargs = _option_kwargs(f.name, hints[section][f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        groups[section].add_argument("--" + key.replace("_", "-"), dest=key, default=argparse.SUPPRESS,
                                     help=f"{f.metadata.get('help', '')} (default: {default})", **kwargs)
    parser.add_argument("--paper", action="store_true", default=argparse.SUPPRESS,
                        help="The paper's protocol instead of our defaults: method matryoshka, init paper, "
                             "deploy_order none (flags you give win; YAML key `paper: true`). Set its learning "
                             "rate too: ~3x below LoRA's, e.g. 3e-4 where LoRA takes 1e-3.")
    parser.add_argument("--config", type=Path, help="YAML file with the same keys as these flags; flags override it.")


def _options(args) -> dict:
    """Flat options: the YAML file (if --config) overridden by the flags given on the command line;
    a --lr flag replaces the file's grid for its method only."""
    from .comparison import COMPARE_KEYS
    from .experiment import load_yaml, run_keys

    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    given = vars(args)
    keys = run_keys()
    values.update({k: v for k, v in given.items() if k in keys or (k in COMPARE_KEYS and k != "lr")})
    if given.get("lr"):
        values["lr"] = {**(values.get("lr") or {}), **_parse_lrs(given["lr"])}
    return values


def run_config(args):
    """RunConfig from YAML (if --config) overridden by the flags given on the command line.

    A config written for `mlora compare` may also hold its methods, lr grids and seeds: one run
    does not use them, and a warning names the values it uses instead.
    """
    from .comparison import COMPARE_KEYS
    from .experiment import RunConfig

    values = _options(args)
    ignored = sorted(k for k in COMPARE_KEYS if k in values)
    for key in ignored:
        values.pop(key)
    try:
        run = RunConfig.from_flat(values)
    except ValueError as e:
        if not getattr(args, "config", None):
            raise
        raise ValueError(f"Invalid run config {args.config} with the command-line options:\n{e}") from None
    if ignored:
        logging.getLogger("matryoshka_lora.cli").warning(
            "%s: %s are `mlora compare` options; `mlora %s` runs one adapter with method=%s, learning_rate=%g, seed=%d "
            "(set them with --method, --learning-rate, --seed).", args.config, ", ".join(ignored), args.command,
            run.adapter.method, run.train.learning_rate, run.train.seed)
    return run


def _train(args):
    from .experiment import train

    result = train(run_config(args))
    print(f"Adapter saved to {result.adapter_dir} ({result.seconds:.0f} s).")


def _harness(args):
    from .evaluation.harness import HarnessConfig, harness_eval
    from .evaluation.report import load_results, markdown_table

    run = run_config(args)  # model/dtype/ranks/shots come from the shared run options
    given = vars(args)
    config = HarnessConfig.from_args(argparse.Namespace(
        model=run.model.model, gguf_file=run.model.gguf_file, dtype=run.model.dtype, adapter=str(args.adapter),
        tasks=args.tasks, ranks=run.eval.eval_ranks, num_fewshot=given.get("num_fewshot"), limit=args.limit,
        metric=args.metric, include_path=args.include_path, gsm8k_dir=args.gsm8k_dir, batch_size=args.harness_batch_size,
        apply_chat_template=args.apply_chat_template, fewshot_as_multiturn=args.fewshot_as_multiturn,
        system_instruction=args.system_instruction, log_samples=args.log_samples,
        out_dir=str(args.out or Path(args.adapter).parent / "eval_harness")))
    paths = harness_eval(config)
    print(markdown_table(load_results(paths["json"])))
    print("Results written to " + ", ".join(str(p) for p in paths.values()))


def _eval(args):
    from .evaluation.report import markdown_table
    from .experiment import evaluate

    if args.harness:
        return _harness(args)
    run = run_config(args)
    out = args.out or Path(args.adapter).parent / f"eval_{args.split}"
    results = evaluate(run, args.adapter, args.split, out_dir=out)
    print(markdown_table(results))
    print(f"Results written to {out}/results.json, results.md, results.png")


def _parse_lrs(items: list[str] | None) -> dict[str, list[float]]:
    out = {}
    for item in items or []:
        method, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"--lr expects METHOD=LR[,LR...], e.g. --lr matryoshka=1e-4,3e-4; got {item!r}")
        out[method] = [float(v) for v in values.split(",")]
    return out


def _compare(args):
    from .comparison import compare, split_options
    from .evaluation.report import markdown_table

    run, config = split_options(_options(args))
    results = compare(run, config, args.out)
    print(markdown_table(results))
    print("Written: " + ", ".join(results["paths"].values()))


def _demo(args):
    from .demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick)


def _compare_options(p):
    from .comparison import CompareConfig

    g = p.add_argument_group("compare options (also YAML keys)")
    for f in dataclasses.fields(CompareConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = ({"action": "append", "metavar": "METHOD=LR[,LR..]"} if f.name == "lr"
                  else _option_kwargs(f.name, typing.get_type_hints(CompareConfig)[f.name]))
        g.add_argument("--" + f.name, dest=f.name, default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {default})", **kwargs)
    p.add_argument("--out", type=Path, default=None, help="Output directory (default: --output-dir).")


def _eval_options(p):
    p.add_argument("--adapter", required=True, type=Path, help="Adapter directory written by `mlora train` (<output_dir>/adapter).")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="Which split to score.")
    p.add_argument("--out", type=Path, default=None, help="Where results.json/.md/.png go (default: next to the adapter).")
    h = p.add_argument_group("lm-evaluation-harness (--harness; needs `pip install 'matryoshka-lora[harness]'`)")
    h.add_argument("--harness", action="store_true", help="Score lm-eval tasks at every rank instead of the built-in evaluator.")
    h.add_argument("--tasks", type=_parse_list(str), default=["gsm8k"],
                   help="lm-eval tasks, e.g. gsm8k,arc_challenge; shipped offline tasks: gsm8k_local, tiny_mc.")
    h.add_argument("--limit", type=float, default=None, help="Only the first N documents per task (quick checks).")
    h.add_argument("--metric", default=None, help="Headline metric, e.g. exact_match,strict-match or acc_norm,none.")
    h.add_argument("--include-path", type=_parse_list(str), default=None, help="Extra folders of lm-eval task YAMLs.")
    h.add_argument("--gsm8k-dir", default=None, help="GSM8K folder (train.jsonl, test.jsonl) for gsm8k_local.")
    h.add_argument("--harness-batch-size", default="1", help="lm-eval batch size: an integer or 'auto'.")
    h.add_argument("--apply-chat-template", action="store_true", help="Wrap lm-eval prompts in the chat template.")
    h.add_argument("--fewshot-as-multiturn", action="store_true", help="With --apply-chat-template: shots as turns.")
    h.add_argument("--system-instruction", default=None, help="Optional system prompt for lm-eval.")
    h.add_argument("--log-samples", action="store_true", help="Also write lm-eval's per-item records.")


def _demo_options(p):
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="Output directory.")
    p.add_argument("--quick", action="store_true", help="A much smaller run (a couple of minutes) to check the setup.")


def _export(args):
    from .core.ranks import parse_rank_spec
    from .deploy.export import export_rank, serving_notes

    if args.format == "gguf":
        from .deploy.gguf_export import export_gguf

        print("wrote", export_gguf(args.adapter, args.rank, args.out, base_model=args.base_model,
                                   default=args.default_rank, overwrite=args.overwrite,
                                   allow_untrained=args.allow_untrained))
        return
    out = export_rank(args.adapter, args.rank, args.out, default=args.default_rank, overwrite=args.overwrite,
                      allow_untrained=args.allow_untrained, results=args.results, method=args.method,
                      layout=args.layout)
    for path in out if isinstance(out, list) else [out]:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        per_layer = isinstance(parse_rank_spec(args.rank), dict)
        for note in serving_notes(max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()]), per_layer, args.layout):
            print("note:", note)
        print(f"wrote {path}")


def _merge(args):
    from .deploy.merge import merge_to_dir

    print("wrote", merge_to_dir(args.model, args.adapter, args.rank, args.out, default=args.default_rank,
                                overwrite=args.overwrite, allow_untrained=args.allow_untrained))


def _fold(args):
    from .core.saving import fold_adapter

    print("wrote", fold_adapter(args.adapter, args.out, overwrite=args.overwrite))


def _fold_args(p):
    p.add_argument("adapter", help="Nested adapter directory trained with a fixed P (matryoshka or custom).")
    p.add_argument("--out", required=True, help="Directory for the folded copy.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")


def _svd(args):
    from .deploy.svd import svd_adapter

    out, notes = svd_adapter(args.src, args.out, overwrite=args.overwrite)
    for note in notes:
        print("note:", note)
    print("wrote", out)


def _svd_args(p):
    p.add_argument("src", help="A nested adapter directory, or any plain PEFT LoRA adapter (adapter_config.json + "
                               "adapter_model.safetensors).")
    p.add_argument("--out", required=True, help="Directory for the SVD-ordered nested adapter.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")


def _recommend(args):
    from .deploy.recommend import recommend_rank

    print(recommend_rank(args.results, args.tolerance, method=args.method, metric=args.metric, adapter=args.adapter))


def _allocate(args):
    from .deploy.allocation_result import curve_table
    from .experiment import allocate

    curve, paths = allocate(run_config(args), args.adapter, args.budget, by=args.by, sweep=args.sweep, out_dir=args.out,
                            num_calibration=args.num_calibration, export=args.export, allow_off=args.allow_off,
                            refresh=args.refresh)
    for note in curve.config.get("notes", []):
        print("note:", note)
    print(curve_table(curve))
    for name, path in paths.items():
        print(f"wrote {name}: {path}")


def _rank_args(p, what):
    p.add_argument("--rank", required=True,
                   help=f"Rank to {what}: 4, several as 1,4,16 (export only), or per layer as q_proj=2,v_proj=8.")
    p.add_argument("--default-rank", type=int, default=None,
                   help="With per-layer ranks: the rank of layers no pattern matches (default: r).")
    p.add_argument("--out", required=True, help="Output directory (with several ranks: parent of rank-<k>/).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    p.add_argument("--allow-untrained", action="store_true", help="Accept ranks outside the trained rank set.")


def _export_args(p):
    p.add_argument("adapter", help="Nested adapter directory written by save_matryoshka.")
    _rank_args(p, "export")
    p.add_argument("--results", default=None, help="results.json: the card then lists the measured accuracy at each rank.")
    p.add_argument("--method", default=None, help="Method in --results to read (needed when it holds several).")
    p.add_argument("--format", choices=["peft", "gguf"], default="peft",
                   help="peft: a PEFT adapter directory; gguf: one llama.cpp LoRA file (--out FILE.gguf) for a GGUF "
                        "base (Llama/Mistral), read with llama.cpp's --lora.")
    p.add_argument("--base-model", default=None,
                   help="--format gguf: the base model whose config names the tensors (Hub id, directory, .gguf, "
                        "smollm2-135m); default: the adapter's base_model_name_or_path.")
    p.add_argument("--layout", choices=["portable", "compact"], default="portable",
                   help="Per-layer ranks: portable (padded to the largest rank, scales baked into lora_B; exact in "
                        "PEFT, vLLM and llama.cpp) or compact (PEFT's rank_pattern/alpha_pattern; PEFT only).")


def _merge_args(p):
    p.add_argument("--model", required=True, help="Base model: local directory or Hugging Face id.")
    p.add_argument("--adapter", required=True, help="Nested adapter directory written by save_matryoshka.")
    _rank_args(p, "merge")


def _recommend_args(p):
    p.add_argument("results", help="results.json (or its directory) written by `mlora eval` / `mlora compare`.")
    p.add_argument("--tolerance", type=float, default=1.0, help="Allowed drop from the best score, in points.")
    p.add_argument("--method", default=None, help="Method to read (default: the only one in the file).")
    p.add_argument("--metric", default=None, help="Metric to rank by (default: the file's headline metric).")
    p.add_argument("--adapter", default=None, help="Adapter directory for exact sizes (default: the file's entry).")


def _allocate_options(p):
    p.add_argument("--adapter", required=True, type=Path,
                   help="Nested adapter directory written by `mlora train`; with --by spectrum any LoRA adapter.")
    p.add_argument("--by", choices=["calibration", "spectrum"], default="calibration",
                   help="calibration: first-order loss drop on --num-calibration validation examples (loads the "
                        "model). spectrum: keep the largest sigma^2 / (m + n) of the SVD-ordered adapter, no data, no "
                        "model (unless --sweep); an adapter that is not SVD-ordered is first written ordered to "
                        "OUT/adapter-svd, and the ranks are its prefixes.")
    p.add_argument("--budget", default=None, metavar="UNIT:VALUE[,..]",
                   help="Budget(s), comma-separated: avg-rank:4 (the size of uniform rank 4), params:500000 "
                        "(adapter parameters) or fraction:0.25 (of the full-rank adapter).")
    p.add_argument("--sweep", action="store_true",
                   help="The whole budget curve: held-out loss (test split, --num-eval examples, default 64) at each budget "
                        "(default: every trained rank and the midpoints) and at each uniform rank; adds allocation.png.")
    p.add_argument("--num-calibration", type=int, default=32, help="Validation examples whose loss steers the search.")
    p.add_argument("--out", type=Path, default=None, help="Output directory (default: allocation/ next to the adapter).")
    p.add_argument("--export", action="store_true", help="Also write each allocation as a plain PEFT adapter "
                                                         "(rank_pattern / alpha_pattern).")
    p.add_argument("--allow-off", action="store_true", help="Let layers switch their adapter off (rank 0).")
    p.add_argument("--refresh", type=float, default=0.25,
                   help="Recompute the first-order scores each time the adapter has grown by this fraction.")


COMMANDS = {  # name -> (library call, help, functions adding its flags)
    "train": (_train, "Train a nested adapter (LoRA / DyLoRA / MatryoshkaLoRA) on the HF Trainer.", [add_run_options]),
    "eval": (_eval, "Evaluate an adapter at every rank and the base model; write JSON, table and plot.",
             [add_run_options, _eval_options]),
    "compare": (_compare, "Train and evaluate several methods on the same data; one combined table.",
                [add_run_options, _compare_options]),
    "demo": (_demo, "Train the default (multirank with split rows, saved in SVD order), LoRA and DyLoRA on the "
                    "embedded SmolLM2-135M and arithmetic task; score every rank.",
             [_demo_options]),
    "export": (_export, "Write rank-k prefixes of a nested adapter as plain PEFT LoRA adapters (no base model needed).",
               [_export_args]),
    "merge": (_merge, "Merge the rank-k prefix into the base model and save a full safetensors model.", [_merge_args]),
    "fold": (_fold, "Write a copy of an adapter with its training P folded into lora_A: rank k then runs the "
                    "prefix of A diag(P) B (eval, export and merge of the copy all use it).", [_fold_args]),
    "svd": (_svd, "Re-factor any LoRA adapter (nested or plain PEFT) by SVD so that every rank prefix is the best "
                  "low-rank cut of its delta; the result works with every mlora command (no base model needed).",
            [_svd_args]),
    "allocate": (_allocate, "Choose a rank per layer under a parameter budget, from one nested adapter (no retraining), "
                            "by calibration loss or, data-free, by the adapter's singular values.",
                 [add_run_options, _allocate_options]),
    "recommend": (_recommend, "Print the smallest rank within --tolerance points of the best, and the rank table.",
                  [_recommend_args]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlora", description="Nested (Matryoshka) LoRA adapters: train once, deploy at any rank.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show info logs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text, adders) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for add in adders:
            add(p)
        p.set_defaults(func=fn)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .evaluation.harness_tasks import HarnessNotInstalled
    try:
        args.func(args)
    except (ValueError, OSError, FloatingPointError, HarnessNotInstalled) as e:  # bad input, disk full, NaN, missing extra: the message names the fix
        print(f"mlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
