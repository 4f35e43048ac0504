"""Command line: `python -m attrprims demo` runs the main job; `python -m attrprims info` describes the build."""

import argparse
import json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attrprims", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="project per-example gradients of a digits MLP and show what is preserved")
    demo.add_argument("--examples", type=int, default=1024, help="training examples whose gradients are projected")
    demo.add_argument("--k", type=int, nargs="+", default=[64, 256, 1024, 4096], help="projected dimensions")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="print attrprims.build_info() as JSON")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run(ks=tuple(args.k), examples=args.examples, seed=args.seed)
    else:
        from . import build_info

        print(json.dumps(build_info(), indent=2))


if __name__ == "__main__":
    main()
