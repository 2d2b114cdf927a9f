"""Label-preserving augmentations for the consistency losses of RoTTA and
ROID, chosen by the input's shape; every draw comes from the caller's
``torch.Generator`` so the benchmark's global random stream is never touched.

* tabular rows ``(N, F)``: Gaussian noise of 0.1 of each feature's spread in
  the batch (the papers augment images only; noise is the tabular analogue);
* signals ``(N, C, L)``: a circular time shift of up to 2 steps, a gain in
  [0.9, 1.1] and noise of 0.05 of the batch's spread;
* images ``(N, C, H, W)``: a translation of up to one pixel, contrast and
  brightness jitter of 10 % and noise of 0.05 of the batch's spread. No
  flips: the digits task's classes are not mirror-symmetric.

The papers' augmentations (colour jitter, affine, blur, flips on 224-pixel
natural images; RoTTA Sec. 3.3, ROID Sec. 3.3 after CoTTA) are too strong
for 16x16 digits; these keep the same intent: a view the label survives.
"""

import torch


def _uniform(shape, low, high, generator):
    return low + (high - low) * torch.rand(shape, generator=generator)


def _roll_each(x, max_shift, generator, dims):
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), len(dims)), generator=generator)
    return torch.stack([torch.roll(row, shifts=tuple(int(s) for s in shift), dims=tuple(d - 1 for d in dims))
                        for row, shift in zip(x, shifts)])


def augment(x, generator):
    """A randomly perturbed copy of the batch ``x`` (2-, 3- or 4-D)."""
    if x.dim() == 2:
        spread = x.std(dim=0, keepdim=True) if len(x) > 1 else x.abs().mean().expand(1, x.shape[1])
        return x + 0.1 * spread * torch.randn(x.shape, generator=generator)
    if x.dim() not in (3, 4):
        raise ValueError(f"augment: expected a 2-, 3- or 4-D batch, got shape {tuple(x.shape)}")
    spread = x.std() if x.numel() > 1 else x.abs().mean()
    if x.dim() == 3:
        x = _roll_each(x, 2, generator, dims=(2,))
        x = x * _uniform((len(x), 1, 1), 0.9, 1.1, generator)
    else:
        x = _roll_each(x, 1, generator, dims=(2, 3))
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _uniform((len(x), 1, 1, 1), 0.9, 1.1, generator) + mean
        x = x + spread * _uniform((len(x), 1, 1, 1), -0.1, 0.1, generator)
    return x + 0.05 * spread * torch.randn(x.shape, generator=generator)
