"""Command line: `python -m attrprims demo` runs the main job; `python -m attrprims info` describes the build."""

import argparse
import json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attrprims", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="TRAK on the bundled digits: helpful/harmful images (PNG), LDS, time")
    demo.add_argument("--models", type=int, default=5, help="ensemble members")
    demo.add_argument("--proj-dim", type=int, default=1024, help="projected dimension k")
    demo.add_argument("--subsets", type=int, default=50, help="retrained models for the LDS")
    demo.add_argument("--out", default="attrprims_demo.png", help="where the PNG grid goes")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("info", help="print attrprims.build_info() as JSON")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run(models=args.models, proj_dim=args.proj_dim, subsets=args.subsets, out=args.out, seed=args.seed,
            progress=not args.no_progress)
    else:
        from . import build_info

        print(json.dumps(build_info(), indent=2))


if __name__ == "__main__":
    main()
