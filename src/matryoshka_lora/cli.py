"""`mlora` command line: each command maps to one library function; no logic lives here."""

from __future__ import annotations

import argparse
import sys


def _demo(args):
    from .demo import run_demo

    run_demo()


def _export(args):
    from .export import export_rank

    out = export_rank(args.adapter, args.rank, args.out, default=args.default_rank, overwrite=args.overwrite,
                      allow_untrained=args.allow_untrained, results=args.results, method=args.method)
    for path in out if isinstance(out, list) else [out]:
        print(f"wrote {path}")


def _merge(args):
    from .merge import merge_to_dir

    print("wrote", merge_to_dir(args.model, args.adapter, args.rank, args.out, default=args.default_rank,
                                overwrite=args.overwrite, allow_untrained=args.allow_untrained))


def _recommend(args):
    from .recommend import recommend_rank

    print(recommend_rank(args.results, args.tolerance, method=args.method, metric=args.metric, adapter=args.adapter))


COMMANDS = {
    "demo": (_demo, "Train LoRA, DyLoRA and MatryoshkaLoRA on the embedded default and report every rank."),
    "export": (_export, "Write rank-k prefixes of a nested adapter as plain PEFT LoRA adapters (no base model needed)."),
    "merge": (_merge, "Merge the rank-k prefix into the base model and save a full safetensors model."),
    "recommend": (_recommend, "Print the smallest rank within --tolerance points of the best, and the rank table."),
}


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


# Command-line flags per command; commands without an entry take none.
ARGUMENTS = {"export": _export_args, "merge": _merge_args, "recommend": _recommend_args}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlora", description="Nested (Matryoshka) LoRA adapters: train once, deploy at any rank.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=fn)
        if name in ARGUMENTS:
            ARGUMENTS[name](p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: the message says the fix
        parser.exit(2, f"mlora {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
