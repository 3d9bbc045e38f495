"""Your own training loop: two custom CNNs trained with DML, then MCL, then PCL (EMA teacher)."""
import torch
from torch import nn

from peerdistill.api import Distiller


class SmallCNN(nn.Module):  # any nn.Module with timm's forward_features / forward_head
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, classes)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, fmap, pre_logits=False):
        emb = fmap.mean((2, 3))
        return emb if pre_logits else self.fc(emb)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


torch.manual_seed(0)
images, labels = torch.randn(64, 1, 28, 28), torch.arange(64) % 4  # your data here
images[:, :, :14] += labels.view(-1, 1, 1, 1)  # learnable: the top half's brightness
for method, params in [("dml", {"temperature": 2.0}), ("mcl", {"feat_dim": 32}), ("pcl", {"rampup_epochs": 0})]:
    d = Distiller([SmallCNN(8), SmallCNN(12)], method, input_shape=(1, 28, 28), **params)
    opt = torch.optim.SGD(d.parameters(), lr=0.05, momentum=0.9)
    totals = []
    for epoch in range(4):
        for k in range(0, 64, 32):
            terms = d.losses(images[k:k + 32], labels[k:k + 32])  # named terms + "total" (CE included)
            opt.zero_grad()
            terms["total"].backward()
            opt.step()
            d.after_step()  # EMA teacher, memory banks, stored predictions
            totals.append(terms["total"].item())
    acc = {h: (z.argmax(1) == labels).float().mean().item() for h, z in d.predict(images).items()}
    print(method, f"total {totals[0]:.3f} (step 1) -> {totals[-1]:.3f} (step {len(totals)}); last step:",
          " ".join(f"{k}={v.item():.3f}" for k, v in terms.items() if k != "total"))
    print(method, "heads (eval mode), accuracy on the 64 images:", " ".join(f"{h}={a:.2f}" for h, a in acc.items()))
