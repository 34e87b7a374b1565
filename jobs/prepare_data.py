"""Build training data: a synthetic crawl (unless --data.input names one), then mine it into clusters.

    python jobs/prepare_data.py --preset cpu [--data.root data]
    python jobs/prepare_data.py --preset cpu --data.input /path/to/img2dataset/output [--data.input_format parquet]
    python jobs/prepare_data.py --preset cpu --data.root s3://bucket/nd [--data.input s3://bucket/crawl]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare_data.py --preset cpu --data.root /abs/path/data

Writes <data.root>/<preset>/: crawl/ (synthetic only), ground_truth.parquet, world.json,
clusters/*.parquet, manifest.json. Joins the Ray cluster named by RAY_ADDRESS (as under
`ray job submit`), else starts a local one in this process.
"""

import os
import sys
from pathlib import Path

# the package lives in platform/ (a plain folder, never a package: it would shadow the stdlib `platform`)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402

import ray  # noqa: E402

from neighbor_diffusion import config  # noqa: E402
from neighbor_diffusion.data import crawl, mining  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_cli_arguments(parser)
    args = parser.parse_args(argv)
    with config.cli_errors(parser, (config.ConfigError, FileNotFoundError)):
        cfg = config.from_cli_args(args)
        if cfg.data.input:
            mining.crawl_files(cfg.data.input, cfg.data.input_format)  # before Ray starts, not in the mining
        paths = mining.layout(cfg)  # data.root may be a filesystem URI: s3://bucket/prefix (see data/storage.py)
        try:
            paths["base"].mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. no such bucket, no access
            raise config.ConfigError(f"data.root={cfg.data.root!r}: {e}") from None

    if not cfg.data.input:
        summary = crawl.generate_crawl(cfg, paths["base"])
        print(f"crawl: {summary['pairs']} pairs on {summary['pages']} pages -> {summary['crawl_dir']}")

    # the package must reach Ray workers too: ship platform/ on their PYTHONPATH
    platform_dir = str(Path(__file__).resolve().parents[1] / "platform")
    # ("platform" relative: workers of `ray job submit` run in their copy of the working dir)
    pythonpath = os.pathsep.join(["platform", platform_dir])
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)  # the job's own runtime env (working_dir) is merged in
    else:
        ray.init(include_dashboard=False, runtime_env=runtime_env)
    try:
        manifest = mining.mine(cfg)
    finally:
        ray.shutdown()
    keys = ("pairs_in", "pairs_out", "clusters_out", "pairs_dropped_by_reason", "damaged_files", "pairs_per_s",
            "filter")  # fmt: skip
    print(json.dumps({k: manifest.get(k) for k in keys}, indent=1))
    print(f"manifest: {paths['manifest']}")


if __name__ == "__main__":
    main()
