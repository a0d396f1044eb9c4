"""Named Swin backbone presets, read from ``plans/backbones.json`` (no architecture numbers in code)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from nnssl.errors import NnsslError
from nnssl.plans import did_you_mean, load_plan


@dataclass(frozen=True)
class BackbonePreset:
    """The shape of a Swin encoder; enough to rebuild it exactly (stored in every checkpoint).

    ``input_size`` is the crop the preset is meant for (voxels, each side a multiple of
    ``patch_size ** 5``); the other fields are MONAI ``SwinUNETR`` arguments.
    """

    name: str
    feature_size: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int
    qkv_bias: bool
    mlp_ratio: float
    input_size: tuple[int, int, int]
    description: str = field(default="", compare=False)

    @property
    def stride(self) -> int:
        """Total downsampling of the deepest output: patch embedding, then MONAI merges patches after every stage."""
        return self.patch_size * 2 ** len(self.depths)

    @property
    def divisor(self) -> int:
        """Every input side must be a multiple of this (MONAI checks ``patch_size ** 5``)."""
        return self.patch_size**5

    @property
    def stage_channels(self) -> list[int]:
        """Channels of the 5 encoder outputs: patch embedding, then stages 1-4."""
        return [self.feature_size * 2**i for i in range(len(self.depths) + 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BackbonePreset":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise NnsslError(f"Backbone preset has unknown fields {sorted(unknown)}; valid: {sorted(known)}.")
        values = dict(values)
        for key in ("depths", "num_heads", "input_size"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        try:
            return cls(**values)
        except TypeError as err:
            raise NnsslError(f"Backbone preset {values.get('name', '?')} is incomplete: {err}") from None


def list_presets() -> list[str]:
    return sorted(k for k in load_plan("backbones.json") if not k.startswith("_"))


def get_preset(name: str) -> BackbonePreset:
    """The preset called ``name`` in ``plans/backbones.json`` (``paper``, ``monai``, ``tiny``, ...)."""
    table = load_plan("backbones.json")
    names = list_presets()
    if name not in names:
        raise NnsslError(
            f"Unknown backbone preset '{name}'.{did_you_mean(name, names)} Known presets: {', '.join(names)} "
            f"(defined in plans/backbones.json). Choose one with --backbone NAME or the environment "
            f"variable nnssl_backbone=NAME."
        )
    return BackbonePreset.from_dict({"name": name, **table[name]})
