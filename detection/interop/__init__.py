"""detectron2 / AdelaiDet interop: their conventions on torchvision models, their backend, their checkpoints."""
