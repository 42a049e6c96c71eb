"""What the PyTorch examples (torch_train.py, torchrun_train.py) share: the CNN, its state."""
import torch

nn = torch.nn


def build_model(dtype, seed=0):
    """The CNN with torch's own BatchNorm layers; the same weights in every process."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10))
    return model.to(dtype)


def state(model):
    """Parameters and running statistics as float64 arrays, in a fixed order."""
    return {name: t.detach().double().numpy().copy()
            for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if not name.endswith("num_batches_tracked")}
