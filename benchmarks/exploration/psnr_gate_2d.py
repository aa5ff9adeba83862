import numpy as np
from pathlib import Path
from metaseg.method.weights import load_weights
from metaseg.io.data import load_slice, load_splits
from metaseg.method.segment import segment_array
from metaseg.method.preprocess import normalize_intensity
w = load_weights(Path("Resources/Weights/metaseg2d.safetensors")); net = w.build()
root = Path("../shared/data/brains"); sp = load_splits()
rng = np.random.default_rng(0)
for s in sp["train"] + sp["validation"] + sp["test"]:
    sl = load_slice(root / s)
    r = segment_array(net, w.log_lr, w.plan, sl.image, w.canvas)
    img = normalize_intensity(sl.image)
    inv = np.where(img > 0, 1.2 - img, 0)
    r2 = segment_array(net, w.log_lr, w.plan, inv, w.canvas)
    noise = rng.random(sl.image.shape).astype(np.float32)
    r3 = segment_array(net, w.log_lr, w.plan, noise, w.canvas)
    print(s, round(r.psnr, 1), "inverted", round(r2.psnr, 1), "noise", round(r3.psnr, 1), flush=True)
