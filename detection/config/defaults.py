"""The default configuration tree: every key a config file or a `KEY VALUE` override may set.

One place for all stages so that a single YAML file can describe a teacher, its cache and a student,
and so that an unknown key anywhere is caught (see detection.config). Names follow detectron2 where a
detectron2 user would look for them.
"""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {
    "OUTPUT_DIR": "./output",
    "SEED": 0,
    "CUDNN_BENCHMARK": False,
    "MODEL": {
        # RetinaNet | FCOS | FasterRCNN | MaskRCNN (torchvision.models.detection) | CondInst | SOLOv2
        # (detection/modeling/meta_arch/condinst.py, detection/modeling/meta_arch/solov2.py; both need MASK_ON True)
        "META_ARCHITECTURE": "RetinaNet",
        "DEVICE": "cpu",
        # Path to a checkpoint (ours, or a torchvision state dict). Empty: train from scratch.
        "WEIGHTS": "",
        # Number of foreground classes. 0: taken from the training dataset's categories.
        "NUM_CLASSES": 0,
        # RGB, in 0-255 pixel units (torchvision's ImageNet statistics).
        "PIXEL_MEAN": [123.675, 116.28, 103.53],
        "PIXEL_STD": [58.395, 57.12, 57.375],
        # Batched images are zero-padded (after normalisation) to a multiple of this.
        "SIZE_DIVISIBILITY": 32,
        "BACKBONE": {
            "DEPTH": 50,  # 18 | 34 | 50 | 101
            # ResNet stages frozen from the stem (0 = none, 5 = all), as torchvision's trainable_layers.
            "FREEZE_AT": 0,
            # FrozenBN | BN (BN for training from scratch, FrozenBN for ImageNet-initialised backbones)
            "NORM": "BN",
        },
        # FPN width; TOP_BLOCK_IN: where RetinaNet/FCOS compute P6 from, "p5" | "res5" | "" (= res5 for
        # RetinaNet under detectron2 conventions, else p5).
        "FPN": {"OUT_CHANNELS": 256, "TOP_BLOCK_IN": ""},
        # Anchor base size per FPN level (5 values, RetinaNet P3-P7 / R-CNN RPN P2-P6); RetinaNet adds
        # 3 octave scales per base. Empty: torchvision's [32, 64, 128, 256, 512]. Small images (the
        # synthetic demo) want smaller anchors.
        # ASPECT_RATIOS (h / w) and OFFSET are used under MODEL.CONVENTIONS detectron2 (torchvision's
        # anchors are (0.5, 1, 2) at offset 0, rounded).
        "ANCHOR_GENERATOR": {"SIZES": [], "ASPECT_RATIOS": [0.5, 1.0, 2.0], "OFFSET": 0.0},
        # RetinaNet head normalisation, as detectron2's MODEL.RETINANET.NORM: "" (torchvision's v1 head)
        # or "GN" (GroupNorm, torchvision's v2 head; trains far faster from scratch).
        "RETINANET": {"NORM": ""},
        # detectron2 / AdelaiDet interop (docs/D2_INTEROP.md). BACKEND: torchvision | detectron2 (build
        # the model with detectron2 itself from D2_CONFIG, a detectron2 config file or model-zoo name).
        "BACKEND": "torchvision",
        "D2_CONFIG": "",
        # torchvision | detectron2: compute detectron2's (AdelaiDet's for FCOS) function on the torchvision
        # backend - anchors, RoI pooling, proposal selection, post-processing (detection.interop.d2_conventions).
        "CONVENTIONS": "torchvision",
        # Channel order the model normalises in (PIXEL_MEAN/STD are in this order): RGB | BGR.
        "INPUT_FORMAT": "RGB",
        # True for MSRA ResNets (detectron2's ImageNet weights): stride in the bottleneck's 1x1 conv.
        "RESNETS": {"STRIDE_IN_1X1": False},
        # Score threshold and NMS IoU at test time (detections per image: TEST.DETECTIONS_PER_IMAGE).
        "SCORE_THRESH_TEST": 0.05,
        "NMS_THRESH_TEST": 0.5,
        "MASK_ON": False,
        # CondInst (detection/modeling/meta_arch/condinst.py); AdelaiDet's MODEL.CONDINST defaults (Base-CondInst.yaml: 500 proposals).
        "CONDINST": {
            "MASK_OUT_STRIDE": 4,
            # positive locations per batch whose dynamic masks are trained (random subset); -1: all
            "MAX_PROPOSALS": 500,
            "MASK_HEAD": {"CHANNELS": 8, "NUM_LAYERS": 3},
            # P3-P5 -> stride-8 mask features; NORM: BN | GN | "" (none)
            "MASK_BRANCH": {"CHANNELS": 128, "OUT_CHANNELS": 8, "NUM_CONVS": 4, "NORM": "BN"},
        },
        # SOLOv2 (detection/modeling/meta_arch/solov2.py); AdelaiDet's MODEL.SOLOV2 defaults. MODEL.SCORE_THRESH_TEST is its
        # category score threshold (AdelaiDet: 0.1, set in Base-SOLOv2.yaml); NMS_THRESH_TEST is unused.
        "SOLOV2": {
            "NUM_GRIDS": [40, 36, 24, 16, 12],
            # per instance level: [low, high] of sqrt(box area) in pixels of the resized image
            "SCALE_RANGES": [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]],
            "SIGMA": 0.2,  # centre region: sigma x half the box around the mask's centre of mass
            "INSTANCE_CHANNELS": 512,
            "NUM_INSTANCE_CONVS": 4,
            "NUM_MASKS": 256,  # channels of the unified mask features = length of a 1x1 dynamic kernel
            "MASK_CHANNELS": 128,
            "NORM": "GN",  # GN | "" (none)
            "NMS_PRE": 500,
            "MASK_THR": 0.5,
            "UPDATE_THR": 0.05,  # score kept after Matrix NMS
            "NMS_KERNEL": "gaussian",  # gaussian | linear
            "NMS_SIGMA": 2.0,
            "LOSS": {"FOCAL_ALPHA": 0.25, "FOCAL_GAMMA": 2.0, "FOCAL_WEIGHT": 1.0, "DICE_WEIGHT": 3.0},
        },
    },
    "INPUT": {
        # Training resize: the short side is drawn from MIN_SIZE_TRAIN by the augmentation plan.
        "MIN_SIZE_TRAIN": [800],
        "MAX_SIZE_TRAIN": 1333,
        "MIN_SIZE_TEST": 800,
        "MAX_SIZE_TEST": 1333,
        "RANDOM_FLIP": "horizontal",  # horizontal | none
    },
    "DATASETS": {
        "TRAIN": ["coco_2017_train"],
        "TEST": ["coco_2017_val"],
        # User datasets: NAME: [annotation_json, image_root]. Builtin names (coco_2017_train,
        # coco_2017_val) resolve under $DETECTRON2_DATASETS/coco as in detectron2.
        "CATALOG": {},
    },
    "DATALOADER": {
        "NUM_WORKERS": 2,
        "ASPECT_RATIO_GROUPING": True,
    },
    "SOLVER": {
        "MAX_ITER": 90000,
        "IMS_PER_BATCH": 16,
        "BASE_LR": 0.01,
        "MOMENTUM": 0.9,
        "WEIGHT_DECAY": 1e-4,
        "STEPS": [60000, 80000],
        "GAMMA": 0.1,
        "WARMUP_ITERS": 1000,
        "WARMUP_FACTOR": 0.001,
        "CHECKPOINT_PERIOD": 5000,
        "CLIP_GRADIENTS": {"ENABLED": True, "CLIP_TYPE": "value", "CLIP_VALUE": 1.0},
        "AMP": False,
        "LOG_PERIOD": 20,
    },
    "TEST": {
        "EVAL_PERIOD": 0,  # 0: evaluate only at the end
        "DETECTIONS_PER_IMAGE": 100,
    },
    # Stage one: what the teacher cache holds and how it is encoded.
    "CACHE": {
        # Levels to keep; empty: those ICD distils for the architecture (P3-P7 RetinaNet/FCOS/CondInst,
        # P2-P6 R-CNN/SOLOv2).
        "LEVELS": [],
        # Augmentation variants per training image (multi-scale + flip drawn from the plan).
        "NUM_VARIANTS": 1,
        # Seed of the augmentation plan (independent of SEED so students with other seeds share a cache).
        "AUG_SEED": 0,
        # fp32 | fp16 | bf16 | int8 | <any of these>+bitround<K> | auto (chosen by the budget planner)
        "ENCODING": "fp16",
        "COMPRESSOR": "zstd",  # zstd | blosc-lz4 | blosc-zstd
        "BATCH_SIZE": 4,
        "CALIBRATION_SAMPLES": 32,
        "SHARD_SAMPLES": 16,
        "TILE": 64,
        "SKIP_UNREADABLE": False,
    },
    # Stage two: ICD hyperparameters (docs/METHOD.md, sections 2-5).
    "DISTILL": {
        "ENABLED": True,
        "LAMBDA": 8.0,  # 8 for single-stage, 3 for R-CNN
        "NUM_HEADS": 8,
        "HIDDEN_DIM": 256,
        "FFN_DIM": 1024,
        "NEG_RATIO": 5,
        "MAX_QUERIES": 300,  # 100 for R-CNN
        "TEMPERATURE": 1.0,
        "WARMUP_DETACH_ITERS": 1000,
        "REF_JITTER": 0.3,
        # Sine temperature of the position embeddings of the keys and of the queries' reference points.
        "POS_TEMPERATURE": 10000.0,
        # "" (the paper): raw teacher tokens in the keys; "LN": layer-normalised first.
        "KEY_NORM": "",
        # "" (the paper) | "gaussian": a Gaussian around each query's reference point added to the
        # attention logits, of initial width SPATIAL_PRIOR_SIGMA (normalised image units), learnt per query.
        "SPATIAL_PRIOR": "",
        "SPATIAL_PRIOR_SIGMA": 0.15,
        # An `icd fit-decoder` checkpoint (decoder_final.pth) to start the decoder from; "": from scratch.
        "DECODER_WEIGHTS": "",
        # `icd fit-decoder`: fitting the decoder from the cache alone, before stage two.
        "FIT": {"MAX_ITER": 2000, "IMS_PER_BATCH": 8, "HELD_OUT_FRACTION": 0.1, "CHECKPOINT_PERIOD": 500},
        "OPTIMIZER": {
            "BASE_LR": 1e-4,
            "WEIGHT_DECAY": 1e-4,
            "WARMUP_ITERS": 10,
            # Linear warm-up starts at this fraction of BASE_LR. 1.0 is the reference's value (DETR
            # settings in megvii-research/ICD), which makes its 10 warm-up iterations a no-op.
            "WARMUP_FACTOR": 1.0,
            "CLIP_NORM": 0.01,
        },
        # Initialise the student's FPN and head from the teacher weights stored in the cache.
        "INIT_FROM_TEACHER": True,
        # Teacher for --online mode (the reference): architecture, depth and weights.
        "TEACHER": {"META_ARCHITECTURE": "", "DEPTH": 0, "WEIGHTS": ""},
    },
}
