"""Regenerate every CPU figure of the course: `python -m minipaged.experiments --out figures`.

Runs, in order, with the same seed and sizes:

* `fragmentation`  Figure 2: where the KV space goes, per system (ShareGPT and Alpaca);
* `batching`       Figure 13: requests batched at once against the request rate;
* `block_size`     Figure 18b, memory side: paged-cache waste against the block size;
* `timeline`       Figure 2 unrolled over time, contiguous (Pow2) against paged.

Each writes its CSV and PNG into --out (see each module's docstring for what is averaged).
--quick makes every run small (for tests and a first look). Every experiment checks its options
before the first one runs, so a bad option stops with a usage error and writes nothing.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from minipaged.experiments import batching, block_size, cli, fragmentation, timeline


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cli.new_parser(__doc__).parse_args(argv)  # only the common flags, which every experiment takes
    experiments = [
        (fragmentation, [*argv, "--dataset", "sharegpt", "alpaca"]),
        (batching, argv),
        (block_size, argv),
        (timeline, argv),
    ]
    # Every experiment checks its sizes against its own caches: all must pass before the first runs.
    for experiment, experiment_argv in experiments:
        experiment.parse_args(experiment_argv)
    for experiment, experiment_argv in tqdm(experiments, desc="experiments", unit="experiment"):
        experiment.main(experiment_argv)


if __name__ == "__main__":
    main()
