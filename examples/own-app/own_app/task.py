"""The app's own model and data: a small CNN on 8x8 one-channel images of 3 classes, made on the fly (each
class a fixed random pattern plus noise), spread over 3 clients with different class mixes."""

import torch
from torch import nn

NUM_CLIENTS = 3
CLASSES = 3
# client k's share of each class: every client sees all classes, mostly one of them
MIX = ((0.7, 0.2, 0.1), (0.1, 0.7, 0.2), (0.2, 0.1, 0.7))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(4 * 4 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _patterns() -> torch.Tensor:
    return torch.randn(CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(1234))


def _images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return _patterns()[labels] + 1.5 * noise


def client_data(partition: int, size: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition``'s images and labels."""
    counts = [round(share * size) for share in MIX[partition]]
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    return _images(labels, seed=100 + partition), labels


def test_data(size: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(size) % CLASSES
    return _images(labels, seed=999), labels
