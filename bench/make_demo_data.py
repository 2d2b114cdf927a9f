"""Writes ``selfheal_ext/data/digits16.npz``, the data the demo ships with,
and ``selfheal_ext/data/digits_cnn.safetensors``, the model it serves
(``selfheal_ext.demo.train_digits_model`` on the training split).

The 1,797 handwritten digits (8x8, 17 grey levels) of the UCI "Optical
Recognition of Handwritten Digits" data set (Alpaydin and Kaynak, 1998;
CC BY 4.0), as distributed with scikit-learn, upscaled to 16x16 with bilinear
interpolation and stored as uint8, with their labels, in a fixed shuffled
order. Needs scikit-learn; the demo itself does not.

    python bench/make_demo_data.py
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


def main():
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    images = (x[order, 0] * 255).round().to(torch.uint8).numpy()
    labels = torch.tensor(data.target)[order].to(torch.uint8).numpy()
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "selfheal_ext", "data", "digits16.npz")
    np.savez_compressed(path, images=images, labels=labels)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(labels)} images)")

    sys.path.insert(0, os.path.dirname(os.path.dirname(path)))
    from safetensors.torch import save_file
    from selfheal_ext.demo import MODEL_FILE, load_digits, train_digits_model
    model = train_digits_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(MODEL_FILE))
    x, y = load_digits()["test"]
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    print(f"wrote {MODEL_FILE} ({os.path.getsize(MODEL_FILE)} bytes; test accuracy {100 * accuracy:.1f}%)")


if __name__ == "__main__":
    main()
