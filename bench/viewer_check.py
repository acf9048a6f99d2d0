"""How closely the live viewer (`mrnet view`, WebGL 2) draws what `mrnet render` draws: for each model file, three
frames (size, t, window) drawn by the page in headless Chromium against the torch render, in 1/255 units.

    .venv/bin/python bench/viewer_check.py MODEL.mrnet...
"""
import base64
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mrnet_core.modelfile import read_file  # noqa: E402
from pipeline.priors import decode  # noqa: E402
from mrnet_core.render import render  # noqa: E402
from pipeline.viewer import model_entry, page  # noqa: E402

FRAMES = [(48, 40, 1.5, (-1.2, -1.0, 1.3, 0.8)), (64, 64, None, (-1.0, -1.0, 1.0, 1.0)),
          (50, 30, 0.7, (-0.3, -0.2, 0.1, 0.1))]


def main():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        sys.exit("needs chromium")
    print("| model | arch | params | frame | t | mean abs error (1/255) | max (1/255) |")
    print("|---|---|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        html = Path(scratch) / "view.html"
        for path in sys.argv[1:]:
            model, meta = decode(read_file(path), path, str(Path(path).parent))  # a prior beside it, or the default
            html.write_text(page([model_entry(Path(path).stem, model, meta)]))
            for width, height, t, window in FRAMES:
                t = float(len(model.stages)) if t is None else t
                url = f"{html.as_uri()}#frame={width}x{height},{t},{','.join(map(str, window))}"
                dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                                      f"--user-data-dir={scratch}/profile", "--dump-dom", url],
                                     capture_output=True, text=True, timeout=300).stdout
                found = re.search(r'data-frame="([^"]*)"', dom)
                if not found:
                    error = re.search(r'data-error="([^"]*)"', dom)
                    print(f"| {path} | no frame: {error.group(1) if error else dom[:200]} |")
                    continue
                drawn = np.frombuffer(base64.b64decode(found.group(1)), np.uint8).reshape(height, width, 4)[..., :3]
                ref = render(model, width, height, t=t, window=window, index=0).clamp(0, 1)
                ref = ref.expand(3, -1, -1).permute(1, 2, 0).double().numpy()
                error = np.abs(drawn / 255 - ref) * 255
                kind = model.arch.model + (" periodic" if model.arch.periodic else "")
                print(f"| {Path(path).name} | {kind} | {model.arch.params():,} | {width}x{height} | {t:.2f} | "
                      f"{error.mean():.3f} | {error.max():.3f} |", flush=True)


if __name__ == "__main__":
    main()
