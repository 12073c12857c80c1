"""ICDModule: everything ICD trains besides the student, and its own optimizer (docs/METHOD.md, sections 2-5).

The module holds the query encoder, the instance-conditional decoder, the auxiliary predictor and the
student-side value projection. Given teacher and student FPN features of one batch (padded alike) it
returns the distillation loss (reaches the student unless `detach_student`) and the two auxiliary
losses (train the encoder and decoder). Teacher features never receive gradients. It knows nothing
of caches or detectors.

The distilled levels and their strides, fixed for a run, are bound when the module is built and
checked there once; each call checks only its batch (`check_batch`, user errors naming the problem),
and the functions it calls state their shape contracts as asserts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cache_contract.geometry import level_size
from detection.errors import UserError
from stage2_student_distill.method.decoder import (
    AuxiliaryPredictor,
    DecoderOutput,
    InstanceConditionalDecoder,
    check_heads,
)
from stage2_student_distill.method.losses import (
    StudentValueProjection,
    distillation_loss,
    distillation_mask,
    identification_loss,
    localisation_loss,
    prior_entropy,
)
from stage2_student_distill.method.queries import InstanceQueries, QueryBuilder, QueryEncoder
from stage2_student_distill.method.tokens import (
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


def icd_targets(targets: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Detection targets (labels 1..K, 0 = background) -> ICD query targets (labels 0..K-1)."""
    return [{"boxes": target["boxes"], "labels": torch.as_tensor(target["labels"]).long() - 1} for target in targets]


def check_levels(levels: Sequence[str], strides: Strides) -> tuple[list[str], dict[str, int]]:
    """(levels, {level: stride}) of a run, refused with the fix when a level is missing or a stride is not
    positive; `strides` is a {level: stride} (a detector's `strides`, covering the levels) or one per level."""
    levels = [str(name) for name in levels]
    if not levels:
        raise UserError("no feature levels to distil", "set CACHE.LEVELS or use the detector's default levels")
    missing = [lvl for lvl in levels if lvl not in strides] if isinstance(strides, Mapping) else []
    if missing or (not isinstance(strides, Mapping) and len(strides) != len(levels)):
        raise UserError(
            f"no stride given for level(s) {missing or levels}",
            "pass the detector's strides dict (DetectorAdapter.strides) covering every distilled level",
        )
    stride_list = [int(s) for s in strides_for(levels, strides)]
    if any(s <= 0 for s in stride_list):
        raise UserError(f"strides must be positive, got {stride_list}", "use the FPN strides (e.g. 8, 16, 32, 64, 128)")
    return levels, dict(zip(levels, stride_list))


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
        levels: Sequence[str],
        strides: Strides,
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
        self.levels, self.strides = check_levels(levels, strides)
        self.stride_list = [self.strides[name] for name in self.levels]
        if not loss_weight >= 0:
            raise UserError(
                f"DISTILL.LAMBDA={loss_weight} must be >= 0",
                "use 8 (single-stage detectors) or 3 (R-CNNs); 0 trains the decoder but distils nothing "
                "(with DISTILL.INIT_FROM_TEACHER: the teacher-init-only control)",
            )
        if temperature <= 0:
            raise UserError(f"DISTILL.TEMPERATURE={temperature} must be positive", "use 1.0 (the paper's value)")
        if not pos_temperature > 1:
            raise UserError(
                f"DISTILL.POS_TEMPERATURE={pos_temperature} must be > 1",
                "use 10000 (the paper's) or 20 (docs/METHOD.md, section 9.3)",
            )
        self.pos_temperature = float(pos_temperature)
        self.channels = channels
        self.temperature = float(temperature)
        self.loss_weight = float(loss_weight)
        self.query_builder = QueryBuilder(
            num_classes,
            class_prior,
            size_prior_mean,
            size_prior_std,
            neg_ratio=neg_ratio,
            max_queries=max_queries,
            ref_jitter=ref_jitter,
            pos_temperature=pos_temperature,
        )
        self.query_encoder = QueryEncoder(self.query_builder.descriptor_dim, hidden_dim, hidden_dim)
        self.decoder = InstanceConditionalDecoder(
            channels, num_heads, ffn_dim, key_norm=key_norm, spatial_prior=spatial_prior, prior_sigma=prior_sigma
        )
        self.aux_predictor = AuxiliaryPredictor(channels, hidden_dim)
        self.student_value = StudentValueProjection(channels, num_heads)
        # Logged next to the losses, not optimised: {'ident_prior_entropy'} of the last forward().
        self.last_metrics: dict[str, Tensor] = {}

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any],
        num_classes: int,
        channels: int,
        *,
        levels: Sequence[str],
        strides: Strides,
        class_prior: Tensor | Sequence[float] | None = None,
        size_prior_mean: Tensor | None = None,
        size_prior_std: Tensor | None = None,
    ) -> ICDModule:
        """Build from the config's DISTILL node (LAMBDA, NUM_HEADS, HIDDEN_DIM, FFN_DIM, NEG_RATIO, ...)."""
        d = cfg["DISTILL"]
        return cls(
            num_classes,
            channels,
            levels=levels,
            strides=strides,
            num_heads=int(d["NUM_HEADS"]),
            hidden_dim=int(d["HIDDEN_DIM"]),
            ffn_dim=int(d["FFN_DIM"]),
            neg_ratio=float(d["NEG_RATIO"]),
            max_queries=int(d["MAX_QUERIES"]),
            temperature=float(d["TEMPERATURE"]),
            ref_jitter=float(d["REF_JITTER"]),
            pos_temperature=float(d["POS_TEMPERATURE"]),
            key_norm=str(d["KEY_NORM"]),
            spatial_prior=str(d["SPATIAL_PRIOR"]),
            prior_sigma=float(d["SPATIAL_PRIOR_SIGMA"]),
            loss_weight=float(d["LAMBDA"]),
            class_prior=class_prior,
            size_prior_mean=size_prior_mean,
            size_prior_std=size_prior_std,
        )

    # -- the entry check ----------------------------------------------------------------------------
    def check_batch(
        self,
        teacher_features: Mapping[str, Tensor],
        student_features: Mapping[str, Tensor] | None,
        image_sizes: ImageSizes,
        targets: Sequence[Mapping[str, Tensor]],
        generator: torch.Generator,
    ) -> None:
        """Refuse a batch the ICD computation cannot use, naming the problem (once per call)."""
        levels, stride_list = self.levels, self.stride_list
        if not image_sizes or len(targets) != len(image_sizes):
            raise UserError(
                f"{len(targets)} targets for {len(image_sizes)} image sizes",
                "pass one target and one resized (h, w) per image of a non-empty batch",
            )
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise UserError(
                "instance queries need an explicit CPU torch.Generator",
                "pass torch.Generator().manual_seed(seed) (a CPU generator keeps runs identical on any device)",
            )
        for i, size in enumerate(image_sizes):
            if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
                raise UserError(
                    f"image size {tuple(size)} of image {i} is not a positive (h, w)",
                    "pass each image's resized size (h, w) before batch padding",
                )
        for name, features in (("teacher", teacher_features), ("student", student_features)):
            if features is not None:
                self._check_features(name, features, levels, stride_list, image_sizes)
        if student_features is not None:
            for level in levels:
                t_shape, s_shape = tuple(teacher_features[level].shape), tuple(student_features[level].shape)
                if t_shape != s_shape:
                    raise UserError(
                        f"teacher level '{level}' is {t_shape} but the student's is {s_shape}",
                        "pad the teacher features to the student's batch shape (same resized images, same "
                        "size divisibility) before calling ICD",
                    )
        k = self.query_builder.num_classes
        for i, target in enumerate(targets):
            if "boxes" not in target or "labels" not in target:
                raise UserError(
                    f"target {i} lacks 'boxes' or 'labels' (has {sorted(target)})",
                    "pass the detection targets of the batch (dicts with 'boxes' and 'labels')",
                )
            boxes = torch.as_tensor(target["boxes"]).detach().reshape(-1, 4)
            labels = torch.as_tensor(target["labels"]).reshape(-1)
            if len(boxes) != len(labels):
                raise UserError(f"target {i} has {len(boxes)} boxes but {len(labels)} labels", "give one label per box")
            if labels.numel() and (labels.min() < 1 or labels.max() > k):
                raise UserError(
                    f"target {i} has labels {sorted(set(labels.tolist()))} outside 1..{k}",
                    "pass detection targets with contiguous foreground labels 1..K (0 is background)",
                )
            if not torch.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
                raise UserError(
                    f"target {i} has non-finite or inverted boxes",
                    "pass boxes as finite xyxy with x2 >= x1 and y2 >= y1",
                )

    def _check_features(
        self,
        name: str,
        features: Mapping[str, Tensor],
        levels: Sequence[str],
        strides: Sequence[int],
        image_sizes: ImageSizes,
    ) -> None:
        missing = [lvl for lvl in levels if lvl not in features]
        if missing:
            raise UserError(
                f"{name} feature level(s) {missing} missing (have {sorted(features)})",
                "pass features for every distilled level, named like the detector's levels ('p3', ...)",
            )
        for lvl, stride in zip(levels, strides):
            feat = features[lvl]
            if feat.dim() != 4 or feat.shape[0] != len(image_sizes) or feat.shape[1] != self.channels:
                raise UserError(
                    f"{name} level '{lvl}' has shape {tuple(feat.shape)}, expected [{len(image_sizes)}, "
                    f"{self.channels}, H, W] ({len(image_sizes)} images; the ICD module was built for "
                    f"{self.channels} channels)",
                    "pass batched FPN features of one batch; ICD needs teacher and student FPNs of equal width: "
                    "build both with the same MODEL.FPN.OUT_CHANNELS",
                )
            for i, (h, w) in enumerate(image_sizes):
                need = level_size(int(h), int(w), stride)
                if need[0] > feat.shape[2] or need[1] > feat.shape[3]:
                    raise UserError(
                        f"image {i} of size {int(h)}x{int(w)} needs {need[0]}x{need[1]} positions at stride "
                        f"{stride}, but {name} level '{lvl}' is only {feat.shape[2]}x{feat.shape[3]}",
                        "pass the resized size before padding and features padded to cover every image "
                        "(the same batch padding as the student's)",
                    )

    def _decode(
        self,
        teacher_features: Mapping[str, Tensor],
        image_sizes: ImageSizes,
        targets: Sequence[Mapping[str, Tensor]],
        generator: torch.Generator,
    ):
        levels, stride_list = self.levels, self.stride_list
        shapes = level_shapes(teacher_features, levels)
        device = teacher_features[levels[0]].device
        dtype = self.decoder.k_proj.weight.dtype
        key_padding = padding_mask(image_sizes, shapes, stride_list, device)  # [N, S], True at padding
        pos = position_embedding(image_sizes, shapes, stride_list, device, temperature=self.pos_temperature).to(
            dtype
        )  # [N, S, 256]
        tokens = flatten_levels(teacher_features, levels).detach().to(dtype)  # [N, S, C]
        queries = self.query_builder(icd_targets(targets), image_sizes, generator, device)
        token_xy = normalised_token_centres(image_sizes, shapes, stride_list, device).to(dtype)  # [N, S, 2]
        decoded = self.decoder(
            self.query_encoder(queries.descriptors.to(dtype)),
            tokens,
            pos,
            key_padding,
            queries.ref_points.to(dtype),
            token_xy,
        )
        return queries, decoded, key_padding, shapes, stride_list

    def decode(
        self,
        teacher_features: Mapping[str, Tensor],
        image_sizes: ImageSizes,
        targets: Sequence[Mapping[str, Tensor]],
        generator: torch.Generator,
    ) -> DecodedBatch:
        """Queries + decoder + auxiliary predictor on teacher features alone (no student needed)."""
        queries, decoded, key_padding, shapes, stride_list = self._decode(
            teacher_features, image_sizes, targets, generator
        )
        return DecodedBatch(queries, decoded, self.aux_predictor(decoded.queries), key_padding, shapes, stride_list)

    @staticmethod
    def auxiliary_losses(batch: DecodedBatch) -> dict[str, Tensor]:
        """{'loss_ident', 'loss_loc'}: the losses that train the query encoder and the decoder."""
        q = batch.queries
        return {
            "loss_ident": identification_loss(batch.aux, q.is_real, q.padding),
            "loss_loc": localisation_loss(batch.aux, q.boxes, q.ref_points, q.is_real),
        }

    # -- training ---------------------------------------------------------------------------------
    def forward(
        self,
        teacher_features: Mapping[str, Tensor],
        student_features: Mapping[str, Tensor],
        image_sizes: ImageSizes,
        targets: Sequence[Mapping[str, Tensor]],
        generator: torch.Generator,
        detach_student: bool,
    ) -> dict[str, Tensor]:
        """Losses of one batch: {'loss_distill', 'loss_ident', 'loss_loc'}.

        teacher_features / student_features: {level: [N, C, H, W]} padded to the same batch shape (at
        least the module's levels); image_sizes: resized (h, w) per image before padding; targets:
        detection targets (boxes xyxy in the resized pixel frame, labels 1..K); generator: CPU generator for the fake queries and jitter; detach_student: the distillation
        loss trains only the student-side projection, not the student (first iterations).
        """
        self.check_batch(teacher_features, student_features, image_sizes, targets, generator)
        batch = self.decode(teacher_features, image_sizes, targets, generator)
        decoded = batch.decoded
        student_tokens = flatten_levels(student_features, self.levels)  # [N, S, C]
        if detach_student:
            student_tokens = student_tokens.detach()
        mask = distillation_mask(decoded.logits, batch.queries.is_real, self.temperature)  # [N, heads, S]
        self.last_metrics = {"ident_prior_entropy": prior_entropy(batch.queries.is_real, batch.queries.padding)}
        return {
            "loss_distill": distillation_loss(
                self.student_value(student_tokens.to(decoded.values.dtype)),
                decoded.values,
                mask,
                batch.key_padding,
                self.loss_weight,
            ),
            **self.auxiliary_losses(batch),
        }

    # -- visualisation ----------------------------------------------------------------------------
    @torch.no_grad()
    def attention_masks(
        self,
        teacher_features: Mapping[str, Tensor],
        image_sizes: ImageSizes,
        targets: Sequence[Mapping[str, Tensor]],
        generator: torch.Generator | None = None,
    ) -> list[dict[str, Tensor]]:
        """Per image, {level: [n_real, heads, h_l, w_l]}: softmax_s(A / T) of each real query, cropped to
        the image's valid region (ceil(h / s) x ceil(w / s)); summing over queries gives the loss mask W.
        """
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.check_batch(teacher_features, None, image_sizes, targets, generator)
        queries, decoded, _, shapes, stride_list = self._decode(teacher_features, image_sizes, targets, generator)
        weights = (decoded.logits.float() / self.temperature).softmax(dim=-1)  # [N, h, K, S]
        out = []
        for i, (n_real, (h, w)) in enumerate(zip(queries.num_real, image_sizes)):
            per_level = unflatten_levels(weights[i, :, :n_real].transpose(0, 1), shapes)  # [n, heads, H, W] each
            out.append(
                {
                    level: maps[..., : level_size(h, w, stride)[0], : level_size(h, w, stride)[1]]
                    for level, maps, stride in zip(self.levels, per_level, stride_list)
                }
            )
        return out


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


def build_icd_optimizer(
    module: nn.Module, cfg: Mapping[str, Any], max_iter: int | None = None
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The ICD module's own optimizer (not the student's): AdamW(DISTILL.OPTIMIZER.BASE_LR, WEIGHT_DECAY)
    with warm-up + cosine over max_iter (default SOLVER.MAX_ITER). Its gradient-norm clip is
    DISTILL.OPTIMIZER.CLIP_NORM, applied by the caller (the trainer clips after unscaling)."""
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
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(max_iter, warmup_iters, warmup_factor))
    return optimizer, scheduler
