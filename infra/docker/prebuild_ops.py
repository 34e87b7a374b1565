"""Compile DeepSpeed's JIT ops into TORCH_EXTENSIONS_DIR at image build time.

    DS_ACCELERATOR=cuda python infra/docker/prebuild_ops.py CPUAdamBuilder
    DS_ACCELERATOR=cpu  python infra/docker/prebuild_ops.py --dry-run ShareMemCommBuilder CPUAdamBuilder

Loading an op through the accelerator is exactly what DeepSpeed does on a worker's first step, so
the cached build is the one it finds there. `--dry-run` only resolves the builders (tests use it).
"""

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builders", nargs="+", help="op builder class names, e.g. CPUAdamBuilder")
    parser.add_argument("--dry-run", action="store_true", help="resolve and check compatibility, build nothing")
    args = parser.parse_args(argv)

    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for name in args.builders:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=True):
            sys.exit(f"{name}: not available on accelerator {accelerator.device_name()!r}")
        if args.dry_run:
            print(f"{name}: op {builder.NAME!r} on {accelerator.device_name()!r} (dry run: not built)")
            continue
        t0 = time.perf_counter()
        builder.load()
        print(f"{name}: op {builder.NAME!r} built in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
