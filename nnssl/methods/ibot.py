"""iBOT (Zhou et al. ICLR 2022, https://arxiv.org/abs/2111.07832) in 3D on the Swin encoder."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from nnssl.errors import NnsslError
from nnssl.losses.distillation import dino_loss, masked_token_distillation_loss, token_mask
from nnssl.data.spec import MaskSpec, ViewSpec
from nnssl.methods.dino import SelfDistillationMethod, as_pair, check_local_crops
from nnssl.methods.registry import register_method
from nnssl.networks.heads import DINOHead
from nnssl.networks.swin import SwinEncoder, global_pool


class MaskedSelfDistillationMethod(SelfDistillationMethod):
    """iBOT and SMIT: the student sees block-masked views (masked patch embeddings replaced by a learned
    mask token, so Swin still gets the full token grid), the teacher the same views unmasked; the patch head
    distills the teacher's tokens of stage ``patch_stage`` into the student's masked ones."""

    def _setup_masked_distillation(self, hp: dict[str, Any], global_stage: int | None) -> None:
        """Mask token, mask geometry, the global and patch heads, teacher and schedules, from the constructor's
        hyperparameters ``hp`` (iBOT and SMIT name them alike). The global representation pools the tokens of
        encoder output ``global_stage`` (None: the patch stage)."""
        stages = len(self.encoder.out_channels) - 1
        if not 1 <= hp["patch_stage"] <= stages:
            raise NnsslError(f"{self.name}: patch_stage must be a Swin stage 1..{stages}, got {hp['patch_stage']}. "
                             f"Fix it in plans/pretrain/{self.name}.json or --plans-override.")
        ratio = as_pair(hp["mask_ratio"], "mask_ratio", self.name)
        if ratio[1] >= 1:
            raise NnsslError(f"{self.name}: mask_ratio must lie in (0, 1), got {hp['mask_ratio']!r}.")
        self.patch_stage = int(hp["patch_stage"])
        self.global_stage = self.patch_stage if global_stage is None else global_stage
        self.mask_ratio = ratio
        # one mask block = one token of the distilled stage (16^3 voxels for stage 3 with Swin patch 2)
        self.mask_block = self.encoder.preset.patch_size * 2**self.patch_stage
        # SimMIM's learned mask token, one value per patch-embedding channel
        self.mask_token = nn.Parameter(torch.zeros(self.encoder.out_channels[0]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        mlp = (hp["hidden_dim"], hp["bottleneck_dim"])
        heads = {"global": DINOHead(self.encoder.out_channels[self.global_stage], hp["out_dim"], *mlp),
                 "patch": DINOHead(self.encoder.out_channels[self.patch_stage], hp["patch_out_dim"], *mlp)}
        warmup = hp["warmup_teacher_temperature_epochs"]
        temperatures = {
            "global": (hp["warmup_teacher_temperature"], hp["teacher_temperature"], 0.0, warmup),
            "patch": (hp["warmup_teacher_patch_temperature"], hp["teacher_patch_temperature"],
                      hp["patch_temperature_hold_epochs"], warmup),
        }
        self._setup(heads, temperatures, hp)

    def mask_spec(self) -> MaskSpec:
        return MaskSpec(ratio=self.mask_ratio, block_size=self.mask_block)

    def _masked_forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Student on the two masked global views, teacher on them unmasked.

        Returns ``views`` ``(2B, C, X, Y, Z)``, their masks on the patch grid ``(2B, X/p, Y/p, Z/p)``, and the
        student's and the teacher's five encoder outputs for the views (``(2B, C_i, x_i, y_i, z_i)`` each).
        """
        views = torch.cat([batch["view1"], batch["view2"]])
        masks = torch.cat([batch["mask1"], batch["mask2"]])  # (2B, X/p, Y/p, Z/p) on the patch grid
        student = self.encoder(views, mask=masks, mask_token=self.mask_token)
        teacher = self._teacher_features(views)
        return views, masks, student, teacher

    def _patch_distillation(self, student_features: list[Tensor], teacher_features: list[Tensor],
                            masks: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked patch-token loss within each view on the tokens of ``patch_stage``; ``masks``:
        ``(2B, X/p, Y/p, Z/p)`` patch-grid masks. Returns the loss and the patch head's collapse statistics."""
        masks = token_mask(masks, 2**self.patch_stage)  # (2B, N), N = x * y * z stage tokens
        student_tokens = student_features[self.patch_stage].flatten(2).transpose(1, 2)  # (2B, N, C)
        teacher_tokens = teacher_features[self.patch_stage].flatten(2).transpose(1, 2)
        student = self.heads["patch"](student_tokens)  # (2B, N, K)
        teacher = self._teacher_head("patch", teacher_tokens)  # (2B, N, K)
        loss = masked_token_distillation_loss(student.chunk(2), teacher.chunk(2), masks.chunk(2),
                                              self._center("patch"), self.student_temperature,
                                              self.teacher_temperatures["patch"])
        return loss, self._update_center("patch", teacher)

    def _global_distillation(self, student_features: list[Tensor], teacher_features: list[Tensor],
                             batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """DINO's loss across the two global views and any local crops of ``batch``, on the pooled tokens of
        ``global_stage``; returns it and the global head's collapse statistics."""
        student = self._student_crops(global_pool(student_features[self.global_stage]), batch, self.global_stage)
        teacher = self._teacher_head("global", global_pool(teacher_features[self.global_stage]))  # (2B, K)
        loss = dino_loss(student, teacher.chunk(2), self._center("global"), self.student_temperature,
                         self.teacher_temperatures["global"])
        return loss, self._update_center("global", teacher)


@register_method("ibot", trainer="SwinUNETR_iBOT_Trainer")
class IBOT(MaskedSelfDistillationMethod):
    """iBOT: DINO's loss on the global representation plus masked image modeling with an online tokenizer,
    i.e. self-distillation of the teacher's patch tokens (full view) into the student's masked patch tokens
    (Eq. 2), on masked tokens only, with its own head, center and temperature schedule.

    As in iBOT's Swin variant, the global representation is the average-pooled last-stage tokens (Swin has
    no [CLS] token). The distilled patch tokens are those of stage ``patch_stage`` (3: 384-d, one token per
    16^3 voxels for the paper backbone; the same tokens SMIT distills), and masks are cubes of exactly one
    such token, so a token is either fully masked or not. Because stage-3 and pooled stage-4 tokens differ
    in width, the patch and global heads are separate (iBOT's released runs share one head over tokens of
    one width). Out dims 8192 and patch temperature 0.04 -> 0.07 are iBOT's defaults; weights 1 and 1.

    Views and masking follow the released Swin-T run (bytedance/ibot README.md, "iBOT Pre-Training with
    Swins"; masks as loader.py ImageFolderMask): ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`` masks each
    global view with probability 1/2, then U(0.1, 0.5) of it (``mask_ratio``, ``p_unmasked``);
    ``--pred_start_epoch 50``: no masking before epoch 50 (``pred_start_epoch``; the patch loss is then 0);
    ``--local_crops_number 10`` student-only local crops (``local_views``, half the patch side by default, as
    DINO's) in the global loss; global and local crops cover area 0.25-1 and 0.05-0.25, here as side fractions
    of the region (their square roots: 0.5-1 and 0.22-0.5); every view gets DataAugmentationiBOT's (DINO's)
    per-view augmentation (``asymmetric``).
    """

    description = "iBOT: DINO loss on pooled tokens + masked patch-token self-distillation (online tokenizer)"

    def __init__(self, encoder: SwinEncoder, out_dim: int = 8192, patch_out_dim: int = 8192,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, patch_stage: int = 3,
                 mask_ratio: Sequence[float] = (0.1, 0.5), p_unmasked: float = 0.5, pred_start_epoch: float = 50,
                 local_views: int = 10, local_size: int | None = None,
                 global_scale: Sequence[float] = (0.5, 1.0), local_scale: Sequence[float] = (0.22, 0.5),
                 momentum: float = 0.996, student_temperature: float = 0.1,
                 warmup_teacher_temperature: float = 0.04, teacher_temperature: float = 0.07,
                 warmup_teacher_patch_temperature: float = 0.04, teacher_patch_temperature: float = 0.07,
                 warmup_teacher_temperature_epochs: float = 30, patch_temperature_hold_epochs: float = 0,
                 center_momentum: float = 0.9, global_weight: float = 1.0, patch_weight: float = 1.0,
                 freeze_last_layer_epochs: float = 1):
        super().__init__(encoder)
        hp = self._check_hyperparameters(locals())
        if not (0 <= p_unmasked <= 1 and pred_start_epoch >= 0):
            raise NnsslError(f"ibot: p_unmasked must lie in [0, 1] and pred_start_epoch be >= 0; got {p_unmasked!r} "
                             f"and {pred_start_epoch!r}. Fix it in plans/pretrain/ibot.json or --plans-override.")
        self._setup_masked_distillation(hp, global_stage=-1)
        self.p_unmasked, self.pred_start_epoch = float(p_unmasked), float(pred_start_epoch)
        self.predicting = self.pred_start_epoch <= 0  # masked prediction on; on_step switches it at the epoch
        self.local_views, self.local_size = check_local_crops("ibot", local_views, local_size, encoder.preset.divisor)
        self.global_scale = as_pair(global_scale, "global_scale", "ibot")
        self.local_scale = as_pair(local_scale, "local_scale", "ibot")
        self.global_weight, self.patch_weight = float(global_weight), float(patch_weight)

    def view_spec(self) -> ViewSpec:
        return ViewSpec(global_views=2, local_views=self.local_views, local_size=self.local_size,
                        global_scale=self.global_scale, local_scale=self.local_scale, augment="asymmetric",
                        mask=MaskSpec(self.mask_ratio, self.mask_block, p_unmasked=self.p_unmasked))

    def on_step(self, epoch: float) -> dict[str, float]:
        self.predicting = epoch >= self.pred_start_epoch
        return super().on_step(epoch)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.predicting:  # before pred_start_epoch the student sees its views unmasked, as iBOT's
            batch = {**batch, **{f"mask{i}": torch.zeros_like(batch[f"mask{i}"]) for i in (1, 2)}}
        _, masks, student, teacher = self._masked_forward(batch)
        patch, patch_stats = self._patch_distillation(student, teacher, masks)
        glob, global_stats = self._global_distillation(student, teacher, batch)
        total = self.global_weight * glob + self.patch_weight * patch
        return {"loss": total, "global_distill": glob.detach(), "patch_distill": patch.detach(),
                **global_stats, **patch_stats}
