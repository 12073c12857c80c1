"""One module per meta-architecture; importing the package registers each one's builder and forward in
detection.modeling.architectures.ARCHITECTURES (as detectron2's meta_arch package fills META_ARCH_REGISTRY)."""

from detection.modeling.meta_arch import condinst, fcos, rcnn, retinanet, solov2  # noqa: F401  (registration)
