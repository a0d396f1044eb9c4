"""nnssl: self-supervised pretraining of Swin encoders on CT, fine-tuned as SwinUNETR inside nnU-Net v2."""
from nnssl.errors import NnsslError

__version__ = "0.1.0"
__all__ = ["NnsslError", "__version__"]
