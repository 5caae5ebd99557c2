"""Search contraction trees with fewer operator calls for TenVOO's networks over the paper
DDPM's 3x3x3 conv shapes (:mod:`tenvoo_fast.contraction.tree_search`); prints what
``tenvoo_fast/methods/tenvoo.py`` declares (``TENVOO_TREES``).

    python benchmarks/search_trees.py [L Q] [--rank 4] [--trials 2000] [--seed 0]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tenvoo_fast.contraction.prereduce import plan  # noqa: E402
from tenvoo_fast.contraction.tree_search import search  # noqa: E402
from tenvoo_fast.methods.channels import default_factors  # noqa: E402
from tenvoo_fast.methods.tenvoo import tenvoo  # noqa: E402
from tests.ddpm_shapes import DDPM_CONV_SHAPES  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", default=["L", "Q"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for variant in args.variants:
        shapes_list, equation = [], None
        for cin, cout in DDPM_CONV_SHAPES:
            net = tenvoo(variant, default_factors(cin), default_factors(cout), (3, 3, 3),
                         args.rank)
            p = plan(net.equation, net.contraction_shapes)
            equation = p.equation
            shapes_list.append(p.shapes)
        found = search(equation, shapes_list, args.trials, args.keep, args.seed)
        print(f"# TenVOO-{variant}, r={args.rank}, {args.trials} trials, seed {args.seed}; "
              f"operator calls saved over the {len(shapes_list)} shapes: "
              f"{[g for g, _ in found]}", flush=True)
        print(f"{variant!r}: {tuple(p for _, p in found)},", flush=True)


if __name__ == "__main__":
    main()
