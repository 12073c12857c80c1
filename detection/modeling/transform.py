"""The transform every model uses: the project's contract that models never resize.

Images reach a model already resized by the augmentation plan (the cache and the student must see
identical pixels), so the transform only normalises and zero-pads (MODEL.PIXEL_MEAN/STD,
MODEL.SIZE_DIVISIBILITY), in the model's channel order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform


class PresizedTransform(GeneralizedRCNNTransform):
    """Normalise (in the model's channel order) and zero-pad; never resize; d2-style output if asked.

    Images reach the model already resized by the augmentation plan (the cache and the student must
    see identical pixels), so there is no resize here.
    """

    def __init__(
        self,
        *,
        input_format: str = "RGB",
        detector_postprocess: Callable[[dict[str, Tensor], tuple[int, int]], dict[str, Tensor]] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.input_format = input_format
        # detectron2's final step (detection.interop.d2_conventions) in place of torchvision's, if given
        self.detector_postprocess = detector_postprocess

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target

    def normalize(self, image: Tensor) -> Tensor:
        # The project's images are RGB; a BGR model's mean/std are in BGR order.
        return super().normalize(image.flip(0) if self.input_format == "BGR" else image)

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training or self.detector_postprocess is None:
            return super().postprocess(result, image_shapes, original_image_sizes)
        return [self.detector_postprocess(r, size) for r, size in zip(result, image_shapes)]
