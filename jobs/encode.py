"""Entry point for `ray job submit`: `mrnet encode` on the cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/encode.py s3://bucket/images/ --out s3://bucket/mrnet/ --config jobs/configs/gpu.toml

Inside a Ray job RAY_ADDRESS is set, so the driver joins that cluster instead of starting a local one.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir: pipeline/ and mrnet_core/

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
