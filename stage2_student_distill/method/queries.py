"""Instance queries built from ground truth each iteration (docs/METHOD.md, section 2), and their encoder.

Each image gets K = min(max(1, floor(n * (1 + r))), max(M, n)) queries: its n ground-truth instances
(real) followed by K - n fake ones drawn from class and box-size priors. A query is described by its
class, a sine embedding of a jittered reference point and a scale indicator; an MLP turns that
descriptor into the decoder's query.

All randomness comes from an explicit CPU torch.Generator and is drawn on the CPU in a fixed order
(per image: fake classes, fake sizes, fake centres, reference jitter), so cached and online training
with the same seed build identical queries on any device.

Choices settled against the authors' reference code (megvii-research/ICD, pytorch_release):
- fake boxes are clipped to the image ([0, 1] in normalised units) after sampling, as the reference
  does; width/height stay within [0.002, 0.7] and mean +- 2 std because the centre is in [0.03, 0.97];
- the scale indicator uses each image's own resized size (the reference uses the last image's size
  for the whole batch, a bug);
- the reference-point embedding interleaves sin/cos per feature index exactly as docs/METHOD.md states
  (the reference concatenates the sin block then the cos block: a fixed permutation of the MLP's
  input, so the two are equivalent);
- padded query slots have all-zero descriptors, boxes and reference points; losses ignore them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MLP

from detection.errors import UserError
from stage2_student_distill.method.tokens import SINE_FEATURES, SINE_TEMPERATURE, ImageSizes, sine_features


def query_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """The fake-query/jitter generator of one iteration of one rank (CPU, as the ICD modules require): a
    function of (seed, rank, iteration) only, so a resumed run draws what the uninterrupted one drew."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(rank), int(iteration)]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & (2**63 - 1))  # SeedSequence wants ints >= 0


SCALE_BINS = 5  # per axis; the indicator is 2 * SCALE_BINS = 10 features
FAKE_CENTRE_RANGE = (0.03, 0.97)
FAKE_SIZE_RANGE = (0.002, 0.7)
UNIFORM_SIZE_MEAN = 0.2
UNIFORM_SIZE_STD = 0.2


def count_queries(num_real: int, neg_ratio: float, max_queries: int) -> int:
    """K = min(max(1, floor(n * (1 + r))), max(M, n)): all real instances are kept, at least one query."""
    return min(max(1, math.floor(num_real * (1 + neg_ratio))), max(max_queries, num_real))


def scale_indicator(sizes_px: Tensor) -> Tensor:
    """[..., 2] box (w, h) in pixels -> [..., 10]: per axis one-hot(clamp(floor(1.44 ln(size) - 5), 0, 4))."""
    # log(0) = -inf clamps to bin 0, so degenerate boxes are handled without a special case
    bins = torch.floor(1.44 * torch.log(sizes_px.float()) - 5.0).clamp(0, SCALE_BINS - 1).long()
    return F.one_hot(bins, SCALE_BINS).flatten(-2).float()


def reference_point_embedding(points: Tensor, temperature: float = SINE_TEMPERATURE) -> Tensor:
    """[..., 2] normalised (x, y) -> [..., 256]: sine features of x then of y, angle = v * 2 pi."""
    return torch.cat(
        [
            sine_features(points[..., 0] * (2 * math.pi), temperature=temperature),
            sine_features(points[..., 1] * (2 * math.pi), temperature=temperature),
        ],
        dim=-1,
    )


@dataclass
class InstanceQueries:
    """A batch of instance queries padded to the batch's largest K (Kmax)."""

    descriptors: Tensor  # [N, Kmax, D] float: one-hot class | ref-point sine embedding | scale indicator
    ref_points: Tensor  # [N, Kmax, 2] float, normalised (x, y) reference points
    boxes: Tensor  # [N, Kmax, 4] float, normalised xyxy (by the resized image's w, h)
    labels: Tensor  # [N, Kmax] long, class 0..K-1 (0 at padding)
    is_real: Tensor  # [N, Kmax] bool, True for ground-truth queries (always the first n of an image)
    padding: Tensor  # [N, Kmax] bool, True at padding slots

    def to(self, device: torch.device | str) -> InstanceQueries:
        return InstanceQueries(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_real(self) -> list[int]:
        return [int(v) for v in self.is_real.sum(1).tolist()]


def estimate_priors(labels: Tensor, sizes_wh: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Class frequency [K] and per-class mean/std [K, 2] of normalised (w, h) from a dataset's instances.

    The COCO prior of the paper is exactly this statistic of COCO train; classes without instances
    fall back to the uniform size prior (mean 0.2, std 0.2).
    """
    labels = labels.long().reshape(-1)
    sizes = sizes_wh.double().reshape(-1, 2)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"instance labels must be in 0..{num_classes - 1}", "pass detection labels minus 1")
    counts = torch.bincount(labels, minlength=num_classes).double()
    mean = torch.full((num_classes, 2), UNIFORM_SIZE_MEAN, dtype=torch.float64)
    std = torch.full((num_classes, 2), UNIFORM_SIZE_STD, dtype=torch.float64)
    for k in torch.nonzero(counts).flatten().tolist():
        member = sizes[labels == k]
        mean[k] = member.mean(0)
        std[k] = member.std(0, unbiased=False)
    return counts.float(), mean.float(), std.float()


class QueryBuilder:
    """Builds padded per-image instance queries for a batch of targets (not a module: it has no weights)."""

    def __init__(
        self,
        num_classes: int,
        class_prior: Tensor | Sequence[float] | None = None,
        size_prior_mean: Tensor | Sequence[Sequence[float]] | None = None,
        size_prior_std: Tensor | Sequence[Sequence[float]] | None = None,
        neg_ratio: float = 5,
        max_queries: int = 300,
        ref_jitter: float = 0.3,
        pos_temperature: float = SINE_TEMPERATURE,
    ) -> None:
        if num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {num_classes}", "pass the number of foreground classes")
        if neg_ratio < 0 or max_queries < 1 or not 0 <= ref_jitter < 0.5:
            raise UserError(
                f"invalid query settings NEG_RATIO={neg_ratio}, MAX_QUERIES={max_queries}, REF_JITTER={ref_jitter}",
                "use NEG_RATIO >= 0, MAX_QUERIES >= 1 and 0 <= REF_JITTER < 0.5 (defaults 5, 300, 0.3)",
            )
        self.num_classes = int(num_classes)
        self.neg_ratio = float(neg_ratio)
        self.max_queries = int(max_queries)
        self.ref_jitter = float(ref_jitter)
        self.pos_temperature = float(pos_temperature)
        self.class_prior = self._class_prior(class_prior)
        self.size_mean, self.size_std = self._size_prior(size_prior_mean, size_prior_std)

    @property
    def descriptor_dim(self) -> int:
        return self.num_classes + 2 * SINE_FEATURES + 2 * SCALE_BINS

    def _class_prior(self, prior: Tensor | Sequence[float] | None) -> Tensor:
        if prior is None:
            return torch.full((self.num_classes,), 1.0 / self.num_classes)
        prior = torch.as_tensor(prior, dtype=torch.float64).cpu()
        if (
            prior.shape != (self.num_classes,)
            or not torch.isfinite(prior).all()
            or (prior < 0).any()
            or prior.sum() <= 0
        ):
            raise UserError(
                f"class prior must be {self.num_classes} non-negative finite frequencies with a positive sum, "
                f"got shape {tuple(prior.shape)}",
                "pass per-class instance counts (e.g. estimate_priors) or None for a uniform prior",
            )
        return (prior / prior.sum()).float()

    def _size_prior(self, mean: object, std: object) -> tuple[Tensor, Tensor]:
        if mean is None and std is None:
            full = (self.num_classes, 2)
            return torch.full(full, UNIFORM_SIZE_MEAN), torch.full(full, UNIFORM_SIZE_STD)
        if mean is None or std is None:
            raise UserError("size prior needs both mean and std", "pass both, or neither for the uniform prior")
        mean_t = torch.as_tensor(mean, dtype=torch.float32).cpu()
        std_t = torch.as_tensor(std, dtype=torch.float32).cpu()
        shape = (self.num_classes, 2)
        if (
            mean_t.shape != shape
            or std_t.shape != shape
            or not torch.isfinite(mean_t).all()
            or not torch.isfinite(std_t).all()
            or (std_t < 0).any()
        ):
            raise UserError(
                f"size prior mean/std must be finite [{self.num_classes}, 2] tensors of normalised (w, h) "
                f"with std >= 0, got {tuple(mean_t.shape)} and {tuple(std_t.shape)}",
                "pass per-class statistics (e.g. estimate_priors) or None for the uniform prior",
            )
        return mean_t, std_t

    def _fake_boxes(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        classes = torch.multinomial(self.class_prior, count, replacement=True, generator=generator)
        noise = torch.randn(count, 2, generator=generator)
        mean, std = self.size_mean[classes], self.size_std[classes]
        wh = torch.minimum(torch.maximum(mean + std * noise, mean - 2 * std), mean + 2 * std)
        wh = wh.clamp(*FAKE_SIZE_RANGE)
        low, high = FAKE_CENTRE_RANGE
        centre = low + (high - low) * torch.rand(count, 2, generator=generator)
        boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=1).clamp(0.0, 1.0)
        return boxes, classes

    def __call__(
        self,
        targets: Sequence[Mapping[str, Tensor]],
        image_sizes: ImageSizes,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> InstanceQueries:
        """Queries for a batch: targets' boxes are xyxy pixels of the resized image, labels 0..K-1.

        Inputs as ICDModule.check_batch accepts them; `generator` is a CPU torch.Generator, so cached
        and online training with one seed build identical queries on any device.
        """
        assert len(targets) == len(image_sizes) and targets, f"{len(targets)} targets for {len(image_sizes)} sizes"
        assert generator.device.type == "cpu", "instance queries draw from a CPU generator"
        per_image = []
        for target, size in zip(targets, image_sizes):
            h, w = int(size[0]), int(size[1])
            real_px = torch.as_tensor(target["boxes"]).detach().cpu().float().reshape(-1, 4)
            real_labels = torch.as_tensor(target["labels"]).detach().cpu().long().reshape(-1)
            n = len(real_labels)
            k = count_queries(n, self.neg_ratio, self.max_queries)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes, labels = real_px / scale, real_labels
            if k > n:
                fake_boxes, fake_labels = self._fake_boxes(k - n, generator)
                boxes, labels = torch.cat([boxes, fake_boxes]), torch.cat([labels, fake_labels])
            wh = boxes[:, 2:] - boxes[:, :2]
            centre = (boxes[:, :2] + boxes[:, 2:]) / 2
            jitter = (torch.rand(k, 2, generator=generator) * 2 - 1) * self.ref_jitter
            ref = centre + jitter * wh
            descriptor = torch.cat(
                [
                    F.one_hot(labels, self.num_classes).float(),
                    reference_point_embedding(ref, self.pos_temperature),
                    scale_indicator(wh * scale[:2]),
                ],
                dim=1,
            )
            per_image.append((descriptor, ref, boxes, labels, n, k))

        batch, k_max = len(per_image), max(item[5] for item in per_image)
        out = InstanceQueries(
            descriptors=torch.zeros(batch, k_max, self.descriptor_dim),
            ref_points=torch.zeros(batch, k_max, 2),
            boxes=torch.zeros(batch, k_max, 4),
            labels=torch.zeros(batch, k_max, dtype=torch.long),
            is_real=torch.zeros(batch, k_max, dtype=torch.bool),
            padding=torch.ones(batch, k_max, dtype=torch.bool),
        )
        for i, (descriptor, ref, boxes, labels, n, k) in enumerate(per_image):
            out.descriptors[i, :k] = descriptor
            out.ref_points[i, :k] = ref
            out.boxes[i, :k] = boxes
            out.labels[i, :k] = labels
            out.is_real[i, :n] = True
            out.padding[i, :k] = False
        return out.to(device) if device is not None else out


class QueryEncoder(nn.Module):
    """Descriptor -> query: MLP of 3 linear layers with ReLU between (hidden 256, out 256 by default)."""

    def __init__(self, descriptor_dim: int, hidden_dim: int = 256, out_dim: int = 256) -> None:
        super().__init__()
        self.mlp = MLP(descriptor_dim, [hidden_dim, hidden_dim, out_dim])

    def forward(self, descriptors: Tensor) -> Tensor:
        return self.mlp(descriptors)
