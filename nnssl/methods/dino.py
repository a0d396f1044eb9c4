"""DINO (Caron et al. ICCV 2021, https://arxiv.org/abs/2104.14294) in 3D, and the teacher-student machinery
it shares with iBOT and SMIT.

The student (the Swin encoder and its heads) is trained by backpropagation; the teacher is an EMA copy of
the student (the shared loop updates it from :meth:`~SelfDistillationMethod.ema_pairs`, momentum 0.996
raised to 1 on a cosine schedule). The encoder that fine-tuning uses is the student's (``encoder``,
exported as ``encoder_final.pth``); the teacher's is :meth:`~SelfDistillationMethod.teacher_encoder`.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from nnssl.errors import NnsslError
from nnssl.losses.distillation import (collapse_stats, dino_loss, teacher_probabilities, updated_center,
                                       validate_momentum, validate_temperature)
from nnssl.data.spec import ViewSpec
from nnssl.methods.base import SSLMethod
from nnssl.methods.registry import register_method
from nnssl.networks.heads import DINOHead, frozen_copy
from nnssl.networks.swin import SwinEncoder, global_pool
from nnssl.schedules import linear_warmup_then_constant


class SelfDistillationMethod(SSLMethod):
    """Base of DINO, iBOT and SMIT: EMA teacher, centers, teacher-temperature schedules, frozen last layers.

    Subclasses build their student heads (:class:`DINOHead`s named ``"global"``, ``"patch"``) and call
    :meth:`_setup`; it makes the teacher (a frozen copy of student encoder and heads), one center buffer per
    head (``center_<head>``, ``(out_dim,)``) and the temperature schedules. The teacher stays in eval mode
    (no drop path, as the reference teachers are built without it) and never gets a gradient.
    """

    family = "self-distillation"
    local_views = 0  # student-only local crops (``local1 ..`` in the batch); DINO and iBOT set their number

    def _check_hyperparameters(self, values: dict[str, Any]) -> dict[str, Any]:
        """The constructor's hyperparameters (its ``locals()``, less ``self`` and ``encoder``), checked by name
        (``*temperature``, ``*momentum``, ``*epochs``, ``*weight``) before any work."""
        hp = {k: v for k, v in values.items() if k not in ("self", "encoder", "__class__")}
        try:
            for name, value in hp.items():
                if name.endswith("temperature"):
                    validate_temperature(name, value)
                elif name.endswith("momentum"):
                    validate_momentum(name, value)
                elif (name.endswith("epochs") or name.endswith("weight")) and not value >= 0:
                    raise ValueError(f"{name} must be >= 0, got {value!r}")
        except ValueError as err:
            raise NnsslError(f"{self.name}: {err}. Set it under \"method\" in plans/pretrain/{self.name}.json or "
                             f"with --plans-override.") from None
        return hp

    def _setup(self, heads: dict[str, DINOHead], temperatures: dict[str, tuple[float, float, float, float]],
               hp: dict[str, Any]) -> None:
        """``temperatures``: head -> (warmup start, final value, epochs held at the start, warmup epochs);
        ``hp``: the checked hyperparameters (``momentum``, ``student_temperature``, ``center_momentum``,
        ``freeze_last_layer_epochs`` are read here)."""
        self.momentum = float(hp["momentum"])
        self.student_temperature = float(hp["student_temperature"])
        self.center_momentum = float(hp["center_momentum"])
        self.freeze_last_layer_epochs = float(hp["freeze_last_layer_epochs"])
        self.heads = nn.ModuleDict(heads)
        self.teacher = frozen_copy(nn.ModuleDict({"encoder": self.encoder, "heads": self.heads}))
        self.teacher.eval()
        for name, head in heads.items():
            self.register_buffer(f"center_{name}", torch.zeros(head.last_layer.out_features))
        self._temperature_schedules = temperatures
        self.teacher_temperatures = {head: start for head, (start, _, _, _) in temperatures.items()}

    def train(self, mode: bool = True) -> "SelfDistillationMethod":
        super().train(mode)
        self.teacher.eval()
        return self

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.teacher["encoder"]), (self.heads, self.teacher["heads"])]

    def teacher_encoder(self) -> SwinEncoder:
        return self.teacher["encoder"]

    def on_step(self, epoch: float) -> dict[str, float]:
        """Teacher temperatures at fractional ``epoch``: held at the start value for ``hold`` epochs, then a
        linear warmup to the final value (DINO/iBOT ``teacher_temp_schedule``, per step instead of per epoch)."""
        for head, (start, end, hold, warmup) in self._temperature_schedules.items():
            self.teacher_temperatures[head] = linear_warmup_then_constant(max(epoch - hold, 0.0), warmup, start, end)
        return {_log_name("teacher_temp", head): value for head, value in self.teacher_temperatures.items()}

    def frozen_parameters(self, epoch: float) -> Iterable[nn.Parameter]:
        """The heads' weight-normalised last layers during the first ``freeze_last_layer_epochs`` epochs
        (DINO's ``cancel_gradients_last_layer``: "freezing it during the first epoch helps training")."""
        if epoch >= self.freeze_last_layer_epochs:
            return []
        return [p for head in self.heads.values() for p in head.last_layer.parameters() if p.requires_grad]

    @torch.no_grad()
    def _teacher_features(self, x: Tensor) -> list[Tensor]:
        return self.teacher["encoder"](x)

    @torch.no_grad()
    def _teacher_head(self, head: str, tokens: Tensor) -> Tensor:
        return self.teacher["heads"][head](tokens)

    def _student_crops(self, global_pooled: Tensor, batch: dict[str, Tensor], stage: int) -> tuple[Tensor, ...]:
        """The global head's student outputs ``(B, K)`` per crop: the two global views (``global_pooled``,
        ``(2B, C)``), then each local crop, pooled from encoder output ``stage``. As DINO's MultiCropWrapper:
        one encoder pass for all local crops, one head pass for all crops."""
        pooled = [global_pooled]
        if self.local_views:
            local_views = torch.cat([batch[f"local{i}"] for i in range(1, self.local_views + 1)])
            pooled.append(global_pool(self.encoder(local_views)[stage]))  # (L * B, C)
        return self.heads["global"](torch.cat(pooled)).chunk(2 + self.local_views)

    def _center(self, head: str) -> Tensor:
        return getattr(self, f"center_{head}")

    @torch.no_grad()
    def _update_center(self, head: str, teacher_logits: Tensor) -> dict[str, Tensor]:
        """After the loss: collapse-guard statistics of the teacher's output under the center it was scored
        with, then the center's EMA update. ``teacher_logits``: ``(M, K)`` rows (images or tokens)."""
        center = self._center(head)
        flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        probs = teacher_probabilities(flat, center, self.teacher_temperatures[head])
        entropy, std = collapse_stats(flat, probs)
        center.copy_(updated_center(center, flat, self.center_momentum))
        return {_log_name("teacher_entropy", head): entropy, _log_name("teacher_std", head): std}


def _log_name(stat: str, head: str) -> str:
    """``teacher_entropy`` for the global head, ``teacher_patch_entropy`` for the patch head."""
    return stat if head == "global" else stat.replace("teacher_", f"teacher_{head}_")


def check_local_crops(method: str, local_views: int, local_size: int | None, divisor: int) -> tuple[int, tuple | None]:
    """``local_views`` and ``local_size`` as a method keeps them (None: :func:`nnssl.data.views.default_local_size`);
    a negative count or a size off the Swin input grid is an NnsslError naming ``method``'s plan."""
    if local_views < 0 or (local_size is not None and (local_size <= 0 or local_size % divisor)):
        raise NnsslError(f"{method}: local_views must be >= 0 and local_size a positive multiple of {divisor} (the "
                         f"Swin input divisor); got {local_views} and {local_size}. Fix it in "
                         f"plans/pretrain/{method}.json or --plans-override.")
    return int(local_views), None if local_size is None else (int(local_size),) * 3


def as_pair(values: Sequence[float], name: str, method: str) -> tuple[float, float]:
    """A (low, high) range from a plan value (JSON lists become tuples); a bad one is an NnsslError."""
    pair = tuple(float(v) for v in values)
    if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
        raise NnsslError(f"{method}: {name} must be a range [low, high] with 0 < low <= high, got {values!r}. "
                         f"Fix it in plans/pretrain/{method}.json or --plans-override.")
    return pair  # type: ignore[return-value]


@register_method("dino", trainer="SwinUNETR_DINO_Trainer")
class DINO(SelfDistillationMethod):
    """DINO: the student matches the centered, sharpened output of an EMA teacher across views.

    Multi-crop (Sec. 3.1): two global views of the patch size (teacher and student) and ``local_views``
    small ``local_size``^3 crops (student only), all cut from one region the size of the patch; the loss is
    the cross-entropy over pairs of different views. Each view is augmented as DataAugmentationDINO does
    (facebookresearch/dino main_dino.py), in 3D: flips, a colour-jitter analogue (brightness, contrast, gamma;
    p 0.8), Gaussian blur at p 1.0 / 0.1 / 0.5 for global view 1, global view 2 and the local crops, and an
    intensity inversion, the solarization analogue, of global view 2 at p 0.2 (``nnssl.data.augmentations``,
    ``asymmetric``: BYOL's two views, which DINO adopts, plus the local crops). The image representation is the
    average-pooled last-stage Swin tokens (768-d for the paper backbone; Swin has no [CLS] token), and the head is
    "a 3-layer MLP with hidden dimension 2048 followed by l2 normalization and a weight normalized fully
    connected layer with K dimensions" (bottleneck 256).

    3D choices (overridable in ``plans/pretrain/dino.json``): ``out_dim`` K = 8192 instead of ImageNet's
    65536, as the same lab's 3D iBOT/SMIT heads (a CT corpus has far fewer image-level modes than ImageNet's
    1.28 M images, and the last layer would otherwise outweigh the encoder). Crop extents are DINO's
    area fractions (0.4, 1) and (0.05, 0.4) as side fractions of the region (their square roots);
    ``local_size`` defaults to half the patch side (64 at the 128^3 paper crop; DINO: 96 / 224), on the
    Swin's input grid (:func:`nnssl.data.views.default_local_size`); a number sets it (a multiple of 32).
    Temperatures, centering, EMA and the frozen first-epoch last layer are the paper's; weight decay
    0.04 -> 0.4 and gradient clipping 3.0 are loop settings in the plan.
    """

    description = "DINO: EMA-teacher self-distillation with centering/sharpening over 2 global + local 3D crops"

    def __init__(self, encoder: SwinEncoder, out_dim: int = 8192, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, local_views: int = 8, local_size: int | None = None,
                 global_scale: Sequence[float] = (0.63, 1.0), local_scale: Sequence[float] = (0.22, 0.63),
                 momentum: float = 0.996, student_temperature: float = 0.1,
                 warmup_teacher_temperature: float = 0.04, teacher_temperature: float = 0.07,
                 warmup_teacher_temperature_epochs: float = 30, center_momentum: float = 0.9,
                 freeze_last_layer_epochs: float = 1):
        super().__init__(encoder)
        hp = self._check_hyperparameters(locals())
        self.local_views, self.local_size = check_local_crops("dino", local_views, local_size, encoder.preset.divisor)
        self.global_scale = as_pair(global_scale, "global_scale", "dino")
        self.local_scale = as_pair(local_scale, "local_scale", "dino")
        head = DINOHead(encoder.out_channels[-1], out_dim, hidden_dim, bottleneck_dim)
        schedule = (warmup_teacher_temperature, teacher_temperature, 0.0, warmup_teacher_temperature_epochs)
        self._setup({"global": head}, {"global": schedule}, hp)

    def view_spec(self) -> ViewSpec:
        return ViewSpec(global_views=2, local_views=self.local_views, local_size=self.local_size,
                        global_scale=self.global_scale, local_scale=self.local_scale, augment="asymmetric")

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        global_views = torch.cat([batch["view1"], batch["view2"]])  # (2B, C, X, Y, Z)
        student = self._student_crops(global_pool(self.encoder(global_views)[-1]), batch, -1)  # (B, K) per view
        teacher = self._teacher_head("global", global_pool(self._teacher_features(global_views)[-1]))  # (2B, K)
        loss = dino_loss(student, teacher.chunk(2), self._center("global"), self.student_temperature,
                         self.teacher_temperatures["global"])
        return {"loss": loss, **self._update_center("global", teacher)}
