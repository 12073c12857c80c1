"""ICDModule: everything ICD trains besides the student, and its own optimizer (ICD_METHOD.md sections 2-5).

The module holds the query encoder, the instance-conditional decoder, the auxiliary predictor and the
student-side value projection. Given teacher and student FPN features of one batch (padded alike) it
returns the distillation loss (reaches the student unless `detach_student`) and the two auxiliary
losses (train the encoder and decoder). Teacher features never receive gradients. It knows nothing
of caches or detectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from detection.errors import UserError
from stage2_student_distill.decoder import AuxiliaryPredictor, DecoderOutput, InstanceConditionalDecoder, check_heads
from stage2_student_distill.losses import (
    StudentValueProjection,
    distillation_loss,
    distillation_mask,
    identification_loss,
    localisation_loss,
    prior_entropy,
)
from stage2_student_distill.queries import InstanceQueries, QueryBuilder, QueryEncoder
from stage2_student_distill.tokens import (
    SINE_TEMPERATURE,
    ImageSizes,
    Strides,
    flatten_levels,
    level_shapes,
    normalised_token_centres,
    padding_mask,
    position_embedding,
    strides_for,
    unflatten_levels,
)


def icd_targets(targets: Sequence[Mapping[str, Tensor]], num_classes: int) -> list[dict[str, Tensor]]:
    """Detection targets (labels 1..K, 0 = background) -> ICD query targets (labels 0..K-1)."""
    out = []
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise UserError(f"target {i} lacks 'boxes' or 'labels' (has {sorted(target)})",
                            "pass the detection targets of the batch (dicts with 'boxes' and 'labels')")
        labels = torch.as_tensor(target["labels"]).long()
        if labels.numel() and (labels.min() < 1 or labels.max() > num_classes):
            raise UserError(
                f"target {i} has labels {sorted(set(labels.tolist()))} outside 1..{num_classes}",
                "pass detection targets with contiguous foreground labels 1..K (0 is background)",
            )
        out.append({"boxes": target["boxes"], "labels": labels - 1})
    return out


@dataclass
class DecodedBatch:
    """The decoder's view of one batch: its queries, what it computed, and the token layout."""

    queries: InstanceQueries
    decoded: DecoderOutput
    aux: Tensor  # [N, K, 5] auxiliary predictor outputs (identification logit, 4 distance logits)
    key_padding: Tensor  # [N, S] bool, True at padding tokens
    shapes: list[tuple[int, int]]  # (H, W) per level, in token order
    strides: list[int]


class ICDModule(nn.Module):
    """Query encoder + decoder + auxiliary predictor + student-side value projection."""

    def __init__(
        self,
        num_classes: int,
        channels: int = 256,
        *,
        num_heads: int = 8,
        hidden_dim: int = 256,
        ffn_dim: int = 1024,
        neg_ratio: float = 5,
        max_queries: int = 300,
        temperature: float = 1.0,
        ref_jitter: float = 0.3,
        pos_temperature: float = SINE_TEMPERATURE,
        key_norm: str = "",
        spatial_prior: str = "",
        prior_sigma: float = 0.15,
        loss_weight: float = 8.0,
        class_prior: Tensor | Sequence[float] | None = None,
        size_prior_mean: Tensor | None = None,
        size_prior_std: Tensor | None = None,
    ) -> None:
        super().__init__()
        if hidden_dim != channels:
            raise UserError(
                f"DISTILL.HIDDEN_DIM={hidden_dim} differs from the {channels} FPN channels",
                "set DISTILL.HIDDEN_DIM to the FPN channel count (MODEL.FPN.OUT_CHANNELS, 256 by default): "
                "queries and tokens share one width",
            )
        check_heads(channels, num_heads)
        if temperature <= 0:
            raise UserError(f"DISTILL.TEMPERATURE={temperature} must be positive", "use 1.0 (the paper's value)")
        if not pos_temperature > 1:
            raise UserError(f"DISTILL.POS_TEMPERATURE={pos_temperature} must be > 1",
                            "use 10000 (the paper's) or 20 (docs/METHOD.md, section \"Position temperature\")")
        self.pos_temperature = float(pos_temperature)
        self.channels = channels
        self.temperature = float(temperature)
        self.loss_weight = float(loss_weight)
        self.query_builder = QueryBuilder(num_classes, class_prior, size_prior_mean, size_prior_std,
                                          neg_ratio=neg_ratio, max_queries=max_queries, ref_jitter=ref_jitter,
                                          pos_temperature=pos_temperature)
        self.query_encoder = QueryEncoder(self.query_builder.descriptor_dim, hidden_dim, hidden_dim)
        self.decoder = InstanceConditionalDecoder(channels, num_heads, ffn_dim, key_norm=key_norm,
                                                  spatial_prior=spatial_prior, prior_sigma=prior_sigma)
        self.aux_predictor = AuxiliaryPredictor(channels, hidden_dim)
        self.student_value = StudentValueProjection(channels, num_heads)
        # Logged next to the losses, not optimised: {'ident_prior_entropy'} of the last forward().
        self.last_metrics: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], num_classes: int, channels: int, *,
                    class_prior: Tensor | Sequence[float] | None = None,
                    size_prior_mean: Tensor | None = None, size_prior_std: Tensor | None = None) -> "ICDModule":
        """Build from the config's DISTILL node (LAMBDA, NUM_HEADS, HIDDEN_DIM, FFN_DIM, NEG_RATIO, ...)."""
        d = cfg["DISTILL"]
        return cls(
            num_classes, channels,
            num_heads=int(d["NUM_HEADS"]), hidden_dim=int(d["HIDDEN_DIM"]), ffn_dim=int(d["FFN_DIM"]),
            neg_ratio=float(d["NEG_RATIO"]), max_queries=int(d["MAX_QUERIES"]),
            temperature=float(d["TEMPERATURE"]), ref_jitter=float(d["REF_JITTER"]),
            pos_temperature=float(d["POS_TEMPERATURE"]), key_norm=str(d["KEY_NORM"]),
            spatial_prior=str(d["SPATIAL_PRIOR"]), prior_sigma=float(d["SPATIAL_PRIOR_SIGMA"]),
            loss_weight=float(d["LAMBDA"]),
            class_prior=class_prior, size_prior_mean=size_prior_mean, size_prior_std=size_prior_std,
        )

    # -- shared steps -----------------------------------------------------------------------------
    def _check_features(self, name: str, features: Mapping[str, Tensor], levels: Sequence[str],
                        batch: int) -> list[tuple[int, int]]:
        shapes = level_shapes(features, levels)
        first = features[levels[0]]
        if first.shape[1] != self.channels:
            raise UserError(
                f"{name} features have {first.shape[1]} channels, the ICD module was built for {self.channels}",
                "ICD needs teacher and student FPNs of equal width: build both with the same "
                "MODEL.FPN.OUT_CHANNELS (256)",
            )
        if first.shape[0] != batch:
            raise UserError(f"{name} features hold {first.shape[0]} images but {batch} image sizes were given",
                            "pass one resized (h, w) per image of the batch")
        return shapes

    def _decode(self, teacher_features: Mapping[str, Tensor], image_sizes: ImageSizes,
                targets: Sequence[Mapping[str, Tensor]], levels: Sequence[str], strides: Strides,
                generator: torch.Generator):
        if len(targets) != len(image_sizes):
            raise UserError(f"{len(targets)} targets for {len(image_sizes)} image sizes",
                            "pass one target and one resized (h, w) per image")
        shapes = self._check_features("teacher", teacher_features, levels, len(image_sizes))
        stride_list = strides_for(levels, strides)
        device = teacher_features[levels[0]].device
        dtype = self.decoder.k_proj.weight.dtype
        key_padding = padding_mask(image_sizes, shapes, stride_list, device)
        pos = position_embedding(image_sizes, shapes, stride_list, device, temperature=self.pos_temperature).to(dtype)
        tokens = flatten_levels(teacher_features, levels).detach().to(dtype)
        queries = self.query_builder(icd_targets(targets, self.query_builder.num_classes), image_sizes,
                                     generator, device)
        token_xy = normalised_token_centres(image_sizes, shapes, stride_list, device).to(dtype)
        decoded = self.decoder(self.query_encoder(queries.descriptors.to(dtype)), tokens, pos, key_padding,
                               queries.ref_points.to(dtype), token_xy)
        return queries, decoded, key_padding, shapes, stride_list

    def decode(self, teacher_features: Mapping[str, Tensor], image_sizes: ImageSizes,
               targets: Sequence[Mapping[str, Tensor]], levels: Sequence[str], strides: Strides,
               generator: torch.Generator) -> DecodedBatch:
        """Queries + decoder + auxiliary predictor on teacher features alone (no student needed)."""
        queries, decoded, key_padding, shapes, stride_list = self._decode(
            teacher_features, image_sizes, targets, levels, strides, generator)
        return DecodedBatch(queries, decoded, self.aux_predictor(decoded.queries), key_padding, shapes, stride_list)

    @staticmethod
    def auxiliary_losses(batch: DecodedBatch) -> dict[str, Tensor]:
        """{'loss_ident', 'loss_loc'}: the losses that train the query encoder and the decoder."""
        q = batch.queries
        return {"loss_ident": identification_loss(batch.aux, q.is_real, q.padding),
                "loss_loc": localisation_loss(batch.aux, q.boxes, q.ref_points, q.is_real)}

    # -- training ---------------------------------------------------------------------------------
    def forward(
        self,
        teacher_features: Mapping[str, Tensor],
        student_features: Mapping[str, Tensor],
        image_sizes: ImageSizes,
        targets: Sequence[Mapping[str, Tensor]],
        levels: Sequence[str],
        strides: Strides,
        generator: torch.Generator,
        detach_student: bool,
    ) -> dict[str, Tensor]:
        """Losses of one batch: {'loss_distill', 'loss_ident', 'loss_loc'}.

        teacher_features / student_features: {level: [N, C, H, W]} padded to the same batch shape;
        image_sizes: resized (h, w) per image before padding; targets: detection targets (boxes xyxy
        in the resized pixel frame, labels 1..K); strides: {level: stride} or one per level;
        generator: CPU generator for the fake queries and jitter; detach_student: the distillation
        loss trains only the student-side projection, not the student (first iterations).
        """
        self._check_features("student", student_features, levels, len(image_sizes))
        for level in levels:
            t_shape, s_shape = tuple(teacher_features[level].shape), tuple(student_features[level].shape)
            if t_shape != s_shape:
                raise UserError(
                    f"teacher level '{level}' is {t_shape} but the student's is {s_shape}",
                    "pad the teacher features to the student's batch shape (same resized images, same "
                    "size divisibility) before calling ICD",
                )
        batch = self.decode(teacher_features, image_sizes, targets, levels, strides, generator)
        decoded = batch.decoded
        student_tokens = flatten_levels(student_features, levels)
        if detach_student:
            student_tokens = student_tokens.detach()
        mask = distillation_mask(decoded.logits, batch.queries.is_real, self.temperature)
        self.last_metrics = {"ident_prior_entropy": prior_entropy(batch.queries.is_real, batch.queries.padding)}
        return {
            "loss_distill": distillation_loss(self.student_value(student_tokens.to(decoded.values.dtype)),
                                              decoded.values, mask, batch.key_padding, self.loss_weight),
            **self.auxiliary_losses(batch),
        }

    # -- visualisation ----------------------------------------------------------------------------
    @torch.no_grad()
    def attention_masks(
        self,
        teacher_features: Mapping[str, Tensor],
        image_sizes: ImageSizes,
        targets: Sequence[Mapping[str, Tensor]],
        levels: Sequence[str],
        strides: Strides,
        generator: torch.Generator | None = None,
    ) -> list[dict[str, Tensor]]:
        """Per image, {level: [n_real, heads, h_l, w_l]}: softmax_s(A / T) of each real query, cropped to
        the image's valid region (ceil(h / s) x ceil(w / s)); summing over queries gives the loss mask W.
        """
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        queries, decoded, _, shapes, stride_list = self._decode(
            teacher_features, image_sizes, targets, levels, strides, generator)
        weights = (decoded.logits.float() / self.temperature).softmax(dim=-1)  # [N, h, K, S]
        out = []
        for i, (n_real, (h, w)) in enumerate(zip(queries.num_real, image_sizes)):
            per_level = unflatten_levels(weights[i, :, :n_real].transpose(0, 1), shapes)
            out.append({
                level: maps[..., :-(-int(h) // stride), :-(-int(w) // stride)]
                for level, maps, stride in zip(levels, per_level, stride_list)
            })
        return out

    def queries(self, targets: Sequence[Mapping[str, Tensor]], image_sizes: ImageSizes,
                generator: torch.Generator) -> InstanceQueries:
        """The instance queries forward() would build for these detection targets (for inspection)."""
        return self.query_builder(icd_targets(targets, self.query_builder.num_classes), image_sizes, generator)


# -- the ICD module's own optimizer --------------------------------------------------------------------
def cosine_with_warmup(max_iter: int, warmup_iters: int, warmup_factor: float) -> Callable[[int], float]:
    """LR multiplier: cosine from 1 to 0 over max_iter, times a linear warm-up from warmup_factor to 1.

    detectron2's WarmupCosineLR, which the reference uses (with warmup_factor 1.0).
    """
    def multiplier(it: int) -> float:
        warm = 1.0
        if it < warmup_iters:
            alpha = it / warmup_iters
            warm = warmup_factor * (1 - alpha) + alpha
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(it, max_iter) / max_iter))
    return multiplier


@dataclass
class ICDOptimizer:
    """AdamW + cosine schedule + gradient-norm clipping for the ICD module (not the student).

    The trainer calls `step()` after backward; `state_dict()` / `load_state_dict()` go in checkpoints.
    """

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    clip_norm: float  # max total gradient norm of the ICD parameters; <= 0 disables clipping
    parameters: list[nn.Parameter]

    def step(self) -> Tensor | None:
        """Clip, step, advance the schedule and clear the gradients; returns the pre-clip norm if clipped."""
        norm = None
        if self.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_icd_optimizer(module: nn.Module, cfg: Mapping[str, Any], max_iter: int | None = None) -> ICDOptimizer:
    """AdamW(DISTILL.OPTIMIZER.BASE_LR, WEIGHT_DECAY) with warm-up + cosine over max_iter (SOLVER.MAX_ITER)."""
    opt_cfg = cfg["DISTILL"]["OPTIMIZER"]
    max_iter = int(cfg["SOLVER"]["MAX_ITER"] if max_iter is None else max_iter)
    lr, weight_decay = float(opt_cfg["BASE_LR"]), float(opt_cfg["WEIGHT_DECAY"])
    warmup_iters, warmup_factor = int(opt_cfg["WARMUP_ITERS"]), float(opt_cfg["WARMUP_FACTOR"])
    if max_iter < 1 or lr <= 0 or weight_decay < 0 or warmup_iters < 0 or not 0 < warmup_factor <= 1:
        raise UserError(
            f"invalid ICD optimizer settings: SOLVER.MAX_ITER={max_iter}, DISTILL.OPTIMIZER.BASE_LR={lr}, "
            f"WEIGHT_DECAY={weight_decay}, WARMUP_ITERS={warmup_iters}, WARMUP_FACTOR={warmup_factor}",
            "use MAX_ITER >= 1, BASE_LR > 0, WEIGHT_DECAY >= 0, WARMUP_ITERS >= 0 and 0 < WARMUP_FACTOR <= 1",
        )
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(max_iter, warmup_iters, warmup_factor))
    return ICDOptimizer(optimizer, scheduler, float(opt_cfg["CLIP_NORM"]), parameters)
