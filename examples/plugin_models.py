"""A plugin: a model of your own, registered for every peerdistill command (plugins: [this file])."""
from torch import nn

from peerdistill import MODELS


class TinyCNN(nn.Module):  # a plain nn.Module in timm's convention: forward_features / forward_head
    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                      nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, fmap, pre_logits=False):
        emb = fmap.mean((2, 3))
        return emb if pre_logits else self.head(emb)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@MODELS.register("tinycnn")
def tinycnn(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    """A two-convolution CNN (an example plugin)."""
    return TinyCNN(num_classes, in_channels, width)
