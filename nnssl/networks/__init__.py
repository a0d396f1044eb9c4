"""Swin encoder, SwinUNETR and the small heads SSL methods need."""
from nnssl.networks.presets import BackbonePreset, get_preset, list_presets
from nnssl.networks.swin import ENCODER_PREFIX, SwinEncoder, build_encoder, encoder_state_dict, global_pool
from nnssl.networks.swinunetr import build_swinunetr

__all__ = ["BackbonePreset", "get_preset", "list_presets", "ENCODER_PREFIX", "SwinEncoder", "build_encoder",
           "encoder_state_dict", "global_pool", "build_swinunetr"]
