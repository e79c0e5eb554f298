"""DrasCLR toolkit: self-supervised, anatomy-specific representations of 3D lung CT.

Subpackages (import what you need; heavy dependencies load lazily):

- ``drasclr_lib.data``: manifests, the synthetic cohort, the real offline scan, the patch store.
- ``drasclr_lib.preprocess``: CT reading, resampling, lung mask, atlas, registration, patches.
- ``drasclr_lib.models``: the conditional encoder and the DrasCLR (MoCo) wrapper.
- ``drasclr_lib.losses``: the local and neighbour InfoNCE losses (pure functions).
- ``drasclr_lib.training``: pretraining on CPU, one GPU or many (DDP).
- ``drasclr_lib.embed``: patch and subject embeddings.
- ``drasclr_lib.viz``, ``drasclr_lib.downstream``, ``drasclr_lib.segmentation``.
"""

__version__ = "0.1.0"
