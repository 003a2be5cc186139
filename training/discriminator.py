"""A patch discriminator and the hinge losses that train a codec's decoder adversarially.

Why: a decoder trained on MSE, L1 and edge losses draws the average of every texture its latent
does not pin down, and a world model's latents pin down less than the encoder's do, so the
frames a player sees are blurred twice. A discriminator that judges small patches (is this
32x32 crop the engine's or the decoder's?) pushes the decoder to draw texture that looks real
instead of its mean. The reconstruction losses keep it where the latent says; the adaptive
weight (as VQGAN balances them) scales the adversarial gradient to the reconstruction's at the
decoder's last layer, so neither drowns the other whatever their raw sizes.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PatchDiscriminator(nn.Module):
    """Per-patch real/fake logits of [n, in_channels, h, w] images in [-1, 1] (h, w multiples of 4); 6 input
    channels judge a frame and the next one together."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers += [nn.Conv2d(c_in, c, 4 if stride == 2 else 3, stride=stride, padding=1),
                       nn.LeakyReLU(0.2)]
            c_in = c
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e3) -> torch.Tensor:
    """The scale that makes the adversarial loss's gradient at ``last_layer`` as large as the
    reconstruction loss's (detached: it weights the losses, it is not trained)."""
    g_rec = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, max_weight).detach()
