"""Your own torch Dataset as the engine's data: same validation split, augmentation, mixing and views."""
import sys
import tempfile

import torch
from torch.utils.data import Dataset

import peerdistill as pd
from peerdistill.api import from_torch


class Stripes(Dataset):  # a map-style Dataset of yours: (image in [0, 1], label) pairs
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.images = torch.rand(n, 1, 16, 16, generator=g) * 0.5
        for i, y in enumerate(self.labels.tolist()):  # class y: bright stripes every (y + 2) rows
            self.images[i, :, :: y + 2] += 0.5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


@pd.DATASETS.register("stripes")
def stripes(root=None):
    return from_torch(Stripes(160, seed=0), Stripes(64, seed=1), classes=["2", "3", "4"], crop_padding=2)


out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
cfg = pd.load_config(None, ["data.name=stripes", "model=resnet8", "method=dml", "mixer=cutmix", "epochs=2",
                            "batch_size=32", "optim.lr=0.05", "precision=fp32", "progress=false",
                            "tensorboard=false", "device=cpu"])
summary = pd.train(cfg, out_dir=f"{out}/stripes-dml", echo=False)
for head, m in summary["final"]["test"].items():
    print(f"{head:<10} test top-1 {m['top1']:.1f} %")
