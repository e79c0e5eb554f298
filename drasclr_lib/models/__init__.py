"""DrasCLR models: the location-conditioned convolution, the patch encoder, its random-weight baseline
and the MoCo wrapper."""

from drasclr_lib.models.baselines import calibrate_batchnorm, random_encoder
from drasclr_lib.models.condconv import CondConv3d
from drasclr_lib.models.drasclr import DrasCLR
from drasclr_lib.models.encoder import DrasEncoder, load_encoder

__all__ = ["CondConv3d", "DrasEncoder", "load_encoder", "random_encoder", "calibrate_batchnorm", "DrasCLR"]
