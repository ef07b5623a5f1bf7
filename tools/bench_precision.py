"""Training throughput of one U-Net under a precision policy (run it once per policy, compare).

    python tools/bench_precision.py float32 256 160 16
    python tools/bench_precision.py mixed_bfloat16 256 160 16

Arguments: policy, height, width, base filters. Prints images/s of one epoch of 64 random
images at batch 8 after a warm-up epoch (tracing excluded).
"""
import sys, time
import numpy as np, keras
prec, h, w, bf = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
keras.mixed_precision.set_global_policy(prec)
from tfseg.models import build_model
from tfseg.losses import get_loss
m = build_model("unet", input_shape=(h, w, 3), num_classes=14, depth=4, base_filters=bf, batch_norm=True)
m.compile(optimizer="adam", loss=get_loss("ce", num_classes=14))
x = np.random.rand(64, h, w, 3).astype("float32") * 255; y = np.random.randint(0, 14, (64, h, w, 1))
m.fit(x[:16], y[:16], batch_size=8, epochs=1, verbose=0)
t = time.time(); m.fit(x, y, batch_size=8, epochs=1, verbose=0); dt = time.time() - t
print(prec, h, w, bf, f"{64/dt:.1f} img/s")
