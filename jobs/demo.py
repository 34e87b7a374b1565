"""make demo: the shortest real path that exists today.

Builds the preset's pipeline (untrained), generates one image for a prompt and two
neighbor photos, saves the pipeline and the image. Training (#4) replaces this.
"""

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

from neighbor_diffusion import config as C
from neighbor_diffusion.pipeline import NeighborDiffusionPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    C.add_cli_arguments(parser)
    cfg = C.from_cli_args(parser.parse_args())
    torch.manual_seed(cfg.train.seed)
    pipe = NeighborDiffusionPipeline.from_config(cfg)
    params = sum(p.numel() for p in pipe.unet.parameters())
    out = Path("runs/demo")
    neighbors = [Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (48, 64), (190, 60, 30))]
    t0 = time.perf_counter()
    image = pipe("a photo of the toy on a snowy field", neighbors, seed=0)[0]
    dt = time.perf_counter() - t0
    pipe.save_pretrained(out / "pipeline")
    image.save(out / "sample.png")
    print(f"preset={cfg.preset} unet_params={params:,} sample_seconds={dt:.2f} (untrained model)")
    print(f"pipeline: {out / 'pipeline'}  sample: {out / 'sample.png'}")


if __name__ == "__main__":
    main()
