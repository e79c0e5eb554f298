"""DrasCLR models: the location-conditioned convolution, the patch encoder and the MoCo wrapper."""

from drasclr_lib.models.condconv import CondConv3d
from drasclr_lib.models.drasclr import DrasCLR
from drasclr_lib.models.encoder import DrasEncoder, load_encoder

__all__ = ["CondConv3d", "DrasEncoder", "load_encoder", "DrasCLR"]
