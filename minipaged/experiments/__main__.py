"""Regenerate every CPU figure of the course: `python -m minipaged.experiments --out figures`.

Runs, in order, with the same seed and sizes:

* `fragmentation`  Figure 2: where the KV space goes, per system (ShareGPT and Alpaca);
* `batching`       Figure 13: requests batched at once against the request rate;
* `block_size`     Figure 18b, memory side: paged-cache waste against the block size;
* `timeline`       Figure 2 unrolled over time, contiguous (Pow2) against paged.

Each writes its CSV and PNG into --out (see each module's docstring for what is averaged).
--quick makes every run small (for tests and a first look).
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from minipaged.experiments import batching, block_size, cli, fragmentation, timeline


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cli.new_parser(__doc__).parse_args(argv)  # check the options here; every experiment takes the same ones
    experiments = [
        (fragmentation.main, ["--dataset", "sharegpt", "alpaca"]),
        (batching.main, []),
        (block_size.main, []),
        (timeline.main, []),
    ]
    for experiment, extra in tqdm(experiments, desc="experiments", unit="experiment"):
        experiment([*argv, *extra])


if __name__ == "__main__":
    main()
