"""Choices and defaults of ``nnssl_cka``, in a module that imports nothing heavy, so ``--help`` is instant."""

ENCODER_LAYERS = ("patch_embed", "stage1", "stage2", "stage3", "stage4")
DECODER_LAYERS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
                  "decoder5", "decoder4", "decoder3", "decoder2", "decoder1")
LAYER_GROUPS = {"encoder": ENCODER_LAYERS, "decoder": DECODER_LAYERS, "all": ENCODER_LAYERS + DECODER_LAYERS}
CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
DEFAULT_POOL = 4
KERNELS = ("linear", "rbf")
DEFAULT_BATCH_SIZE = 32  # examples per minibatch (Nguyen et al.: any size >= 4; larger = less variance)
DEFAULT_PATCHES_PER_CASE = 8
