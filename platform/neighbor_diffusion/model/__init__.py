"""Single-device model code: the neighbor-conditioned UNet."""

from neighbor_diffusion.model.neighbor_attention import NeighborAttention, NeighborFeatures
from neighbor_diffusion.model.unet import NeighborUNet

__all__ = ["NeighborAttention", "NeighborFeatures", "NeighborUNet"]
