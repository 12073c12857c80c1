"""The contract between stage one (which writes the teacher cache) and stage two (which reads it).

Both stages go through this package and never import each other, so what one writes and the other
expects is defined once:

- geometry.py: which positions of an FPN level belong to an image (`level_size`, the one ceil(h / s)),
  the padded batch shape, cutting a sample's valid region and padding samples back into a batch;
- teacher.py: building the frozen teacher, running it on images of one padded shape, its FPN + head
  weights and which of them a student takes (DISTILL.INIT_FROM_TEACHER: the head within one head family);
- identity.py: the records a cache carries (teacher, preprocessing, dataset, augmentation plan) and their
  comparison, so a student only reads a cache made from its own pixels.

The on-disk format itself is `cache_format` (no torch); this package is the torch side of the contract.
"""
