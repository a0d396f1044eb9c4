"""Linear probing of Swin encoders on a segmentation task (``nnssl_probe``, ``nnssl_pretrain --probe``)."""
