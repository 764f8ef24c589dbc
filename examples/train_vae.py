"""Train a small variational autoencoder on a store's fused vectors.

The vectors stream from the store through :class:`cxrstore.export.torch_dataset.FusedVectorDataset`
(chunk by chunk, shared between DataLoader workers); nothing is exported first.

    cxrstore demo /tmp/cxr-demo                      # make the synthetic demo store
    python examples/train_vae.py /tmp/cxr-demo/store --epochs 10

or from Python: ``main("/tmp/cxr-demo/store", epochs=10, seed=0)`` returns the mean loss of
each epoch. The latent means of a trained model are a compact representation to fuse with
clinical covariates downstream (e.g. a survival model).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from cxrstore.export.torch_dataset import FusedVectorDataset
from cxrstore.store.store import Store


class VAE(nn.Module):
    """A Gaussian VAE: ``dim -> hidden -> (mu, logvar) of latent -> hidden -> dim``."""

    def __init__(self, dim: int, *, hidden: int = 128, latent: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10, 10)
        z = mu + noise * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """Mean over the batch of the squared reconstruction error (summed over features) + beta * KL."""
    rec = ((recon - x) ** 2).sum(dim=1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    return (rec + beta * kl).mean()


def main(
    store: str | Path,
    *,
    epochs: int = 10,
    seed: int = 0,
    models: Sequence[str] | None = None,
    where: str | None = None,
    batch_size: int = 32,
    hidden: int = 128,
    latent: int = 8,
    lr: float = 1e-3,
    beta: float = 0.01,
    num_workers: int = 0,
) -> list[float]:
    """Train a VAE on the fused, L2-normalised vectors of ``models`` (default: all).

    Returns
    -------
    list of float
        The mean training loss of each epoch.
    """
    st = Store(store)
    chosen = list(models) if models else st.models
    dataset = FusedVectorDataset.from_store(st, chosen, where=where, batch_size=batch_size, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # seeded weights without touching the global generator
        torch.manual_seed(seed)
        model = VAE(dataset.dim, hidden=hidden, latent=latent)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        total, count = 0.0, 0
        model.train()
        for batch in loader:
            x = batch["x"]
            noise = torch.randn(x.shape[0], latent, generator=gen)
            recon, mu, logvar = model(x, noise)
            loss = vae_loss(x, recon, mu, logvar, beta=beta)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * x.shape[0]
            count += x.shape[0]
        losses.append(total / max(count, 1))
    return losses


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a small VAE on a cxrstore store's fused vectors.")
    parser.add_argument("store", type=Path, help="the store folder (e.g. made by `cxrstore demo DIR`: DIR/store)")
    parser.add_argument("--models", default=None, help="comma-separated models (default: all)")
    parser.add_argument("--where", default=None, help="row filter, e.g. \"view == 'PA'\"")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    losses = main(args.store, epochs=args.epochs, seed=args.seed, where=args.where, num_workers=args.workers,
                  models=args.models.split(",") if args.models else None)
    for i, loss in enumerate(losses, 1):
        print(f"epoch {i:3d}  loss {loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
